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

.PHONY: setup build demo test lint fmt clean-runs

setup: $(TORCH_READY)

$(VENV)/.torch-$(TORCH_VERSION):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	touch $@

# Headers only (3 MB of wheels, no dependencies of their own), into the venv torch is in.
$(CUDA_HEADERS_STAMP): | $(VENV)/.torch-$(TORCH_VERSION)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(CUDA_HEADER_WHEELS)
	touch $@

build: $(TORCH_READY)
	$(TORCH_ENV) $(CARGO) build -p medssl

demo: build
	$(MEDSSL) run $(DEMO_CONFIG) --run-dir $(DEMO_RUN) --force

test: $(TORCH_READY)
	$(TORCH_ENV) $(CARGO) test --workspace

lint: $(TORCH_READY)
	$(CARGO) fmt --all --check
	$(TORCH_ENV) $(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean-runs:
	rm -rf runs
