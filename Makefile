# Two commands do everything on a fresh machine with Python 3.11+:
#   make test    create .venv, install the pinned dependencies and the package, run every test
#   make bench   same set-up, then the quick benchmark on the best device present
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# CUTLASS headers for the 2:4 sparse tensor core GEMMs. --no-deps: only the headers are used, and the
# wheel's metadata would pull cuda-python, scipy, networkx, pydot and treelib. The pin lives in
# csrc/cuda/find_cutlass.py, which also refuses headers of another version.
CUTLASS_SPEC ?= $(shell $(PYTHON) csrc/cuda/find_cutlass.py --pinned-spec)
BENCH_ARGS ?=
BUILD_DIR ?= build/cmake

# Rebuild the extension when any C++/CUDA source or the build script changes.
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: test bench install pytest ctest clean

test: install ctest pytest

bench: install
	$(PY) -m bench --suite quick $(BENCH_ARGS)

install: $(VENV)/.extension-built

$(VENV)/.deps-installed: requirements.txt csrc/cuda/find_cutlass.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps "$(CUTLASS_SPEC)"
	touch $@

$(VENV)/.extension-built: $(VENV)/.deps-installed $(CSRC) setup.py pyproject.toml
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

pytest: install
	$(PY) -m pytest

# The kernel sources as a standalone library with their C++ tests (CTest); compiles the CUDA sources
# for sm_80 and sm_90a too when nvcc is on PATH (CUTLASS headers found through the venv's Python).
ctest: install
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
		-DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build $(BUILD_DIR)
	ctest --test-dir $(BUILD_DIR) --output-on-failure

clean:
	rm -rf build $(VENV) sparsekernels/*.so *.egg-info .pytest_cache
