# Entry points. `make test` and `make demo` install what is missing, configure, build and run.
BUILD ?= build
JOBS ?= $(shell nproc)
MODELS ?= models
MODEL ?= $(MODELS)/demo
PORT ?= 8080

.PHONY: all deps configure build test demo serve load-test clean sanitize fuzz tools

# The quick start runs `make serve` and `make test` side by side, in two shells: they take turns at
# installing packages, configuring and building, under one lock of this tree (flock, util-linux,
# which every Debian has), so that two builds never write the same files at once.
LOCK = flock $(CURDIR)/.make.lock

all: build

deps:
	@$(LOCK) scripts/install-deps.sh

$(BUILD)/CMakeCache.txt: | deps
	$(LOCK) cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release

configure: deps $(BUILD)/CMakeCache.txt

build: configure
	$(LOCK) cmake --build $(BUILD) -j $(JOBS)

# Only the programs the demo and the server need (not the tests and benchmarks), so that
# `make serve` serves as soon as they are built.
tools: configure
	$(LOCK) cmake --build $(BUILD) -j $(JOBS) --target m1-mkmodel m1-generate m1-serve

test: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

# A random model of a few hundred MB, then one chat turn with it on the CPU.
$(MODELS)/demo/config.json: | tools
	$(BUILD)/bin/m1-mkmodel --preset demo --out $(MODELS)/demo

demo: tools $(MODELS)/demo/config.json
	$(BUILD)/bin/m1-generate --model $(MODELS)/demo --chat "Tell me about lightning attention." --max-tokens 64 --seed 1

# The OpenAI-compatible server on 127.0.0.1:$(PORT); MODEL=DIR serves another checkpoint.
serve: tools $(if $(filter $(MODELS)/demo,$(MODEL)),$(MODELS)/demo/config.json)
	$(BUILD)/bin/m1-serve --model $(MODEL) --host 127.0.0.1 --port $(PORT)

# The whole test suite under AddressSanitizer (with LeakSanitizer) and UndefinedBehaviorSanitizer,
# in build-asan/. Every report aborts its process, so the test fails even where it only checks an
# exit code; the tools and m1-serve that tests start inherit the options from the environment.
# -O1 -g1 compiles in half the time of -O2 -g, and reports still give file:line of every frame.
ASAN_BUILD ?= build-asan
SANITIZER_OPTIONS = ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:abort_on_error=1:check_initialization_order=1:strict_init_order=1 \
                    LSAN_OPTIONS=suppressions=$(CURDIR)/cmake/lsan.supp:print_suppressions=0 \
                    UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1

$(ASAN_BUILD)/CMakeCache.txt: | deps
	$(LOCK) cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" \
	  -DM1_SANITIZE=address,undefined

sanitize: deps $(ASAN_BUILD)/CMakeCache.txt
	$(LOCK) cmake --build $(ASAN_BUILD) -j $(JOBS)
	$(SANITIZER_OPTIONS) ctest --test-dir $(ASAN_BUILD) --output-on-failure -j $(JOBS)

# The libFuzzer targets of tests/fuzz, built with clang in build-fuzz/, each run for FUZZ_SECONDS
# from its seed corpus, JOBS at a time. What the runs find (corpus entries, crash reproducers,
# logs) goes to build-fuzz/fuzz-out/, not into the repository.
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 30
# Debian 12's clang 14 lacks C++20 the engine uses (lambdas capturing structured bindings).
FUZZ_CLANG ?= 16

$(FUZZ_BUILD)/CMakeCache.txt: | deps
	@$(LOCK) scripts/install-deps.sh clang-$(FUZZ_CLANG) libclang-rt-$(FUZZ_CLANG)-dev
	$(LOCK) cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-$(FUZZ_CLANG) -DM1_FUZZ=ON

fuzz: deps $(FUZZ_BUILD)/CMakeCache.txt
	$(LOCK) cmake --build $(FUZZ_BUILD) -j $(JOBS) --target fuzz_targets
	tests/fuzz/run_fuzzers.sh $(FUZZ_BUILD)/bin $(FUZZ_BUILD)/fuzz-out $(FUZZ_SECONDS) $(JOBS)

# The load test at full length: 64 clients for 60 s against m1-serve (ctest runs it for 15 s).
load-test: build
	M1_LOAD_SECONDS=60 $(BUILD)/bin/test_load

clean:
	rm -rf $(BUILD)
