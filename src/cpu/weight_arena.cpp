#include "cpu/weight_arena.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>

namespace m1::cpu {
namespace {

// Pages never touched cost no memory, so a region's unused end costs at most the huge page it was
// last touched in.
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kAlign = 64;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

WeightArena::~WeightArena() {
  for (const Region& r : regions_) ::munmap(r.base, r.size);
}

void* WeightArena::copy(const void* source, size_t bytes) {
  const size_t need = round_up(std::max<size_t>(bytes, 1), kAlign);
  if (regions_.empty() || regions_.back().size - regions_.back().used < need) {
    // Mapped a huge page larger, then trimmed to start on a huge page (older kernels align only
    // what they choose to): a region's every 2 MiB can then be one huge page.
    const size_t size = round_up(std::max(region_bytes_, need), kHugePage);
    void* mapped = ::mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapped == MAP_FAILED) throw std::bad_alloc();
    auto* const start = static_cast<std::byte*>(mapped);
    auto* const base = start + (kHugePage - reinterpret_cast<uintptr_t>(start) % kHugePage) % kHugePage;
    if (base > start) ::munmap(start, size_t(base - start));
    if (start + kHugePage > base) ::munmap(base + size, size_t(start + kHugePage - base));
    ::madvise(base, size, MADV_HUGEPAGE);  // advice only: without huge pages the weights still work
    regions_.push_back({base, size, 0});
  }
  Region& r = regions_.back();
  std::byte* piece = r.base + r.used;
  r.used += need;
  if (bytes > 0) std::memcpy(piece, source, bytes);
  return piece;
}

size_t WeightArena::used() const {
  size_t total = 0;
  for (const Region& r : regions_) total += r.used;
  return total;
}

}  // namespace m1::cpu
