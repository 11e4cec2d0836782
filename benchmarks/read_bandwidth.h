#pragma once
// The memory read bandwidth decode is bound by, measured on the weights themselves.

#include "m1/safetensors.h"

namespace m1::bench {

// Bytes per second at which `threads` threads (0: one per core) read every tensor of `checkpoint`
// (mapped file pages, or weights held in memory): the median of three timed passes after a warm
// pass that faults the pages in. Meaningless for checkpoints that fit in the CPU caches.
double weight_read_bandwidth(const Checkpoint& checkpoint, int threads);

}  // namespace m1::bench
