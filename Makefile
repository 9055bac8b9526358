# medssl: `make demo` runs the demo pre-training, `make test` runs the tests.
#
# The first call creates .venv with torch==$(TORCH_VERSION) from PyPI (tch 0.26 needs exactly
# that libtorch) and builds; later calls reuse both. It also installs the CUDA header wheels
# that match that torch (CUDA_HEADER_WHEELS, as in torch-ext/build.rs), with which NCCL process
# groups are compiled and linked (no GPU needed); they have a stamp of their own, so an existing
# venv gets them at its next `make setup`/`make test` without reinstalling torch. With LIBTORCH
# set to an existing libtorch, the virtual environment is skipped (NCCL is then built only if
# MEDSSL_CUDA_INCLUDE points at those headers).

TORCH_VERSION := 2.13.0
# The CUDA runtime's crt/ and nv/ headers, at the versions torch 2.13's cuda-toolkit==13.0.3
# pins; keep equal to CUDA_HEADER_WHEELS in torch-ext/build.rs.
CUDA_CRT_VERSION := 13.0.88
CUDA_CCCL_VERSION := 13.0.85
CUDA_HEADER_WHEELS := nvidia-cuda-crt==$(CUDA_CRT_VERSION) nvidia-cuda-cccl==$(CUDA_CCCL_VERSION)
PYTHON ?= python3
VENV := .venv
CARGO ?= cargo
CUDA_HEADERS_STAMP := $(VENV)/.cuda-headers-$(CUDA_CRT_VERSION)-$(CUDA_CCCL_VERSION)

ifdef LIBTORCH
# torch-sys reads LIBTORCH from the environment.
TORCH_READY :=
TORCH_ENV :=
else
TORCH_READY := $(VENV)/.torch-$(TORCH_VERSION) $(CUDA_HEADERS_STAMP)
TORCH_ENV := LIBTORCH_USE_PYTORCH=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH"
endif

MEDSSL := target/debug/medssl
DEMO_CONFIG ?= configs/demo/joint_phantom.toml
DEMO_RUN ?= runs/demo

.PHONY: setup build demo test lint fmt clean-runs cmake

setup: $(TORCH_READY) cmake

# JPEG-LS DICOMs: dicom-pixeldata's `charls` feature compiles the CharLS C++ library from the
# source the charls-sys crate ships, with cmake (and the C++ compiler the libtorch bindings
# already need); no system libcharls is used. Installed with apt-get where missing (through
# sudo unless root); without apt-get, a message says what to install.
cmake:
	@if ! command -v cmake >/dev/null 2>&1; then \
		if ! command -v apt-get >/dev/null 2>&1; then \
			echo "error: cmake is missing (needed to compile CharLS, the JPEG-LS decoder) and apt-get is unavailable: install cmake (e.g. brew install cmake, dnf install cmake or pip install cmake) and rerun" >&2; \
			exit 1; \
		fi; \
		if [ "$$(id -u)" -eq 0 ]; then sudo=; \
		elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
		else echo "error: cmake is missing (needed to compile CharLS, the JPEG-LS decoder) and apt-get needs root or sudo: install cmake and rerun" >&2; exit 1; \
		fi; \
		echo "installing cmake with apt-get (needed to compile CharLS, the JPEG-LS decoder)"; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake \
			|| { $$sudo apt-get update -q && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake; } \
			|| { echo "error: apt-get could not install cmake; install it and rerun" >&2; exit 1; }; \
	fi

$(VENV)/.torch-$(TORCH_VERSION):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	touch $@

# Headers only (3 MB of wheels, no dependencies of their own), into the venv torch is in.
$(CUDA_HEADERS_STAMP): | $(VENV)/.torch-$(TORCH_VERSION)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(CUDA_HEADER_WHEELS)
	touch $@

build: $(TORCH_READY) cmake
	$(TORCH_ENV) $(CARGO) build -p medssl

demo: build
	$(MEDSSL) run $(DEMO_CONFIG) --run-dir $(DEMO_RUN) --force

test: $(TORCH_READY) cmake
	$(TORCH_ENV) $(CARGO) test --workspace

lint: $(TORCH_READY) cmake
	$(CARGO) fmt --all --check
	$(TORCH_ENV) $(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean-runs:
	rm -rf runs
