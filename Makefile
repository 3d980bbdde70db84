# The README's two commands:
#   make demo   builds and runs the main demo (CPU; add DEMO_ARGS=--device=cuda on a GPU machine)
#   make test   builds and runs the test suite (GPU tests report "skipped" without a GPU)
BUILD ?= build
CMAKE_FLAGS ?= -DCMAKE_BUILD_TYPE=Release
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
DEMO_ARGS ?=

.PHONY: all build demo test clean format

all: build

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS)

build: $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

demo: build
	./$(BUILD)/examples/m3s-demo $(DEMO_ARGS)

test: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

format:
	clang-format -i include/*.h src/*/*.c src/*/*.h src/cuda/*.cu tests/*.c tests/*.h examples/*.c examples/demo/*.c examples/demo/*.h

clean:
	rm -rf $(BUILD)
