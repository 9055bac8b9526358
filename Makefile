# medssl: `make demo` runs the demo pre-training, `make test` runs the tests.
#
# The first call creates .venv with torch==$(TORCH_VERSION) from PyPI (tch 0.26 needs exactly
# that libtorch) and builds; later calls reuse both. With LIBTORCH set to an existing
# libtorch, the virtual environment is skipped.

TORCH_VERSION := 2.13.0
PYTHON ?= python3
VENV := .venv
CARGO ?= cargo

ifdef LIBTORCH
# torch-sys reads LIBTORCH from the environment.
TORCH_READY :=
TORCH_ENV :=
else
TORCH_READY := $(VENV)/.torch-$(TORCH_VERSION)
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
