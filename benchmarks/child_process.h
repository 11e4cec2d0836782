#pragma once
// Runs a piece of work in a forked child process, so that its peak memory is its own rather than
// the high-water mark of everything the benchmark ran before it.

#include <cstdint>
#include <functional>

#include <nlohmann/json.hpp>

namespace m1::bench {

// Forks, runs `task` in the child and returns what it returned. The child shares the parent's
// memory copy-on-write (weights built once are not rebuilt) but none of its threads, so the task
// must create its own backend. Throws m1::Error with the child's message if the task threw, or
// naming the signal if the child died.
nlohmann::json run_in_child(const std::function<nlohmann::json()>& task);

// Peak resident set size of the calling process (VmHWM), in bytes.
uint64_t peak_rss_bytes();

}  // namespace m1::bench
