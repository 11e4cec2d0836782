#pragma once
// The memory a CPU backend keeps its weights in: anonymous mappings advised into transparent huge
// pages, handed out in 64-byte-aligned pieces. Read through a mapped file's 4 KiB pages instead,
// decode takes about 10% longer and prefill about 15% (README, CPU speed).

#include <cstddef>
#include <vector>

namespace m1::cpu {

class WeightArena {
 public:
  // `region_bytes`: address space mapped at a time (a piece larger than it gets a region of its own).
  explicit WeightArena(size_t region_bytes = size_t(256) << 20) : region_bytes_(region_bytes) {}
  ~WeightArena();
  WeightArena(const WeightArena&) = delete;
  WeightArena& operator=(const WeightArena&) = delete;

  // A copy of `bytes` bytes at `source`, 64-byte aligned, first touched by the calling thread (so
  // on its NUMA node). Throws std::bad_alloc when the memory cannot be mapped.
  void* copy(const void* source, size_t bytes);
  // Bytes handed out so far, alignment included.
  size_t used() const;

 private:
  struct Region {
    std::byte* base;
    size_t size, used;
  };
  size_t region_bytes_;
  std::vector<Region> regions_;
};

}  // namespace m1::cpu
