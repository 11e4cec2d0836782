#pragma once
// The memory read bandwidth decode is bound by, measured on the weights themselves.

#include "m1/safetensors.h"

namespace m1::bench {

// Bytes per second at which `threads` threads (0: one per core) read the weights of `checkpoint` (the
// first 2 GiB of them) copied into memory as the CPU backend holds its own (anonymous, huge pages),
// handed out in pieces of 64 KiB, 1 MiB or 4 MiB: for each size the median of three timed passes;
// the fastest size counts. Meaningless for checkpoints that fit in the CPU caches.
double weight_read_bandwidth(const Checkpoint& checkpoint, int threads);

}  // namespace m1::bench
