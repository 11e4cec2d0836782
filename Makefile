# Entry points. `make test` and `make demo` install what is missing, configure, build and run.
BUILD ?= build
JOBS ?= $(shell nproc)
MODELS ?= models
MODEL ?= $(MODELS)/demo
PORT ?= 8080

.PHONY: all deps configure build test demo serve clean

all: build

deps:
	@scripts/install-deps.sh

$(BUILD)/CMakeCache.txt: | deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release

configure: deps $(BUILD)/CMakeCache.txt

build: configure
	cmake --build $(BUILD) -j $(JOBS)

test: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

# A random model of a few hundred MB, then one chat turn with it on the CPU.
$(MODELS)/demo/config.json: | build
	$(BUILD)/bin/m1-mkmodel --preset demo --out $(MODELS)/demo

demo: build $(MODELS)/demo/config.json
	$(BUILD)/bin/m1-generate --model $(MODELS)/demo --chat "Tell me about lightning attention." --max-tokens 64 --seed 1

# The OpenAI-compatible server on 127.0.0.1:$(PORT); MODEL=DIR serves another checkpoint.
serve: build $(if $(filter $(MODELS)/demo,$(MODEL)),$(MODELS)/demo/config.json)
	$(BUILD)/bin/m1-serve --model $(MODEL) --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf $(BUILD)
