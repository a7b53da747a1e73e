# The two commands a user needs:
#   make run   installs what is missing, builds, creates the tiny default model, starts lorad
#   make test  installs what is missing, builds, runs every C++ (ctest) and Python (pytest) test
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
BUILD_DIR ?= build
# ON or OFF; empty: CMake decides at every configure (ON when nvcc is at /usr/local/cuda or on
# the PATH), so a toolkit installed after a first CPU-only build is taken up.
CUDA ?=
BUILD_TYPE ?= RelWithDebInfo
CONFIG ?= deploy/lorad.yaml
# deploy/setup.sh options (e.g. --no-model in the Docker build) and extra CMake arguments.
SETUP_FLAGS ?=
CMAKE_ARGS ?=
# The model folder `make run` serves (default: the tiny model), e.g. MODEL=/models/Llama-3.2-1B.
MODEL ?=
# Extra arguments for lorad under `make run`, e.g. ARGS="--log-level debug".
ARGS ?=
# Where `make install` puts bin/{lorad,loradctl} and lib/ (every library they load).
PREFIX ?= /opt/lorad
export CCACHE_DIR ?= $(HOME)/.cache/ccache
export CCACHE_MAXSIZE ?= 5G
# Build folders of one checkout share cache hits: paths relative to the checkout, and the
# compiler's working folder (the build folder) left out of the hash.
export CCACHE_BASEDIR ?= $(CURDIR)
export CCACHE_NOHASHDIR ?= 1
# Precompiled headers (torch/torch.h) are cacheable only with these relaxations.
export CCACHE_SLOPPINESS ?= pch_defines,time_macros,include_file_mtime,include_file_ctime

.PHONY: all setup configure build test test-cpp test-py run install format clean

all: build

# deploy/setup.sh is idempotent and quick when everything is present; it prints the paths the
# build needs (venv, tiny model, torch CMake config) as quoted `export NAME=value` lines.
# It also re-runs when the venv that setup.env names is gone (~/.cache/lorad deleted): the file
# would otherwise look up to date and point at nothing. (Running it every time costs ~3 s: the
# torch import.)
SETUP_STALE := $(shell . "$(abspath $(BUILD_DIR))/setup.env" 2>/dev/null && \
  [ -x "$${LORAD_VENV:-}/bin/python" ] || echo setup-force)
$(BUILD_DIR)/setup.env: deploy/setup.sh deploy/requirements.txt tests/fixtures/make_tiny_model.py tests/fixtures/tiny_corpus.txt $(SETUP_STALE)
	@mkdir -p $(BUILD_DIR)
	bash deploy/setup.sh $(SETUP_FLAGS) | grep '^export LORAD_' > $@.tmp
	@mv $@.tmp $@

.PHONY: setup-force
setup-force:

setup: $(BUILD_DIR)/setup.env

configure: setup
	source $(BUILD_DIR)/setup.env && \
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) $(if $(CUDA),-DLORAD_CUDA=$(CUDA),-ULORAD_CUDA) \
	  -DCMAKE_PREFIX_PATH="$$LORAD_TORCH_CMAKE" -DCUDAToolkit_ROOT=/usr/local/cuda $(CMAKE_ARGS) > $(BUILD_DIR)/configure.log || \
	  { cat $(BUILD_DIR)/configure.log; exit 1; }

build: configure
	cmake --build $(BUILD_DIR)

test-cpp: build
	cd $(BUILD_DIR) && ctest --output-on-failure -j2

test-py: build
	source $(BUILD_DIR)/setup.env && \
	LORAD_BUILD_DIR=$(abspath $(BUILD_DIR)) "$$LORAD_VENV/bin/python" -m pytest -q tests/e2e tests/parity

test: test-cpp test-py

run: build
	source $(BUILD_DIR)/setup.env && \
	exec $(BUILD_DIR)/server/lorad --config $(CONFIG) --model "$(if $(MODEL),$(MODEL),$$LORAD_MODEL)" $(ARGS)

# A tree that runs without the build's venv or this checkout (deploy/lorad.service runs it).
# It builds nothing (`make build` first, as yourself: `sudo make install` would build as root).
install:
	bash deploy/collect_runtime_libs.sh $(BUILD_DIR) $(PREFIX)

format:
	find engine kernels server tests clients \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' \) \
	  -print0 | xargs -0 clang-format -i

clean:
	rm -rf $(BUILD_DIR)
