# int4kit: `make demo` and `make test` each set everything up on a fresh machine first.
PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
PIP        := $(VENV)/bin/pip
TORCH      ?= torch==2.14.1
CMAKE_DIR  := build/cmake
export CUDA_HOME ?= /usr/local/cuda

.PHONY: demo test setup venv system-deps build cpp pytest ctest ctest-sanitize bench bench-cpp clean

demo: setup
	$(PY) bench/demo.py

test: setup pytest ctest ctest-sanitize

setup: venv system-deps build

# Python environment: torch (the CUDA 13 build, so the CUDA sources compile) and the test/demo deps.
$(VENV)/.deps: requirements-dev.txt
	$(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# GoogleTest and Google Benchmark for the C++ tests and microbenchmarks (Debian packages).
system-deps:
	@if [ ! -f /usr/include/gtest/gtest.h ] || [ ! -f /usr/include/benchmark/benchmark.h ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q libgtest-dev libbenchmark-dev cmake; \
	fi

# The extension (CPU kernels always; CUDA sources too when torch has CUDA and nvcc is found).
# Rebuilt only when a native source, setup.py or the environment changed (the stamp also needs
# the built library to exist); Python sources are used in place (editable install).
NATIVE_SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \))
BUILD_STAMP    := build/.extension-built

build: $(BUILD_STAMP)

$(BUILD_STAMP): setup.py $(NATIVE_SOURCES) $(VENV)/.deps
	$(PIP) install -q --no-build-isolation -e .
	@mkdir -p $(dir $@) && touch $@

ifeq ($(wildcard python/int4kit/_C*.so),)
.PHONY: $(BUILD_STAMP)
endif

cpp: system-deps
	cmake -S . -B $(CMAKE_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja
	cmake --build $(CMAKE_DIR)

pytest: build
	$(PY) -m pytest -q tests

ctest: cpp
	cd $(CMAKE_DIR) && ctest --output-on-failure

# The C++ tests again, built with AddressSanitizer and UndefinedBehaviorSanitizer (each test
# forces every ISA this CPU has); any finding fails the run.
SANITIZE_DIR := build/cmake-sanitize
ctest-sanitize: system-deps venv
	cmake -S . -B $(SANITIZE_DIR) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DINT4KIT_SANITIZE=ON \
		-DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja
	cmake --build $(SANITIZE_DIR) --target test_kernels test_cuda_layout test_cuda_kernel_emulated
	cd $(SANITIZE_DIR) && ASAN_OPTIONS=abort_on_error=1:detect_leaks=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -E isa_objects

bench: build
	$(PY) bench/bench_linear.py

bench-cpp: cpp
	$(CMAKE_DIR)/bench_kernels

clean:
	rm -rf build $(VENV) python/int4kit/*.so python/*.egg-info
