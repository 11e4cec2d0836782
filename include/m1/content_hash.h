#pragma once
// A streaming 64-bit hash of bytes, for checking that a file's contents are what was written and
// for naming things by their contents. Fast (four independent lanes over 32-byte stripes) and
// well mixed, but not cryptographic: it catches corruption, not forgery.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>

namespace m1 {

class ContentHash {
 public:
  void update(const void* data, size_t size) {
    const auto* p = static_cast<const unsigned char*>(data);
    total_ += size;
    if (buffered_ > 0) {
      const size_t take = std::min(size, kStripe - buffered_);
      std::memcpy(buffer_ + buffered_, p, take);
      buffered_ += take, p += take, size -= take;
      if (buffered_ < kStripe) return;
      stripe(buffer_);
      buffered_ = 0;
    }
    for (; size >= kStripe; p += kStripe, size -= kStripe) stripe(p);
    std::memcpy(buffer_, p, size);
    buffered_ = size;
  }
  void update(std::span<const std::byte> bytes) { update(bytes.data(), bytes.size()); }
  void update(std::string_view text) { update(text.data(), text.size()); }
  template <class T>
  void update_value(const T& value) {
    update(&value, sizeof value);
  }

  uint64_t value() const {
    uint64_t h = std::rotl(lanes_[0], 1) + std::rotl(lanes_[1], 7) + std::rotl(lanes_[2], 12) + std::rotl(lanes_[3], 18);
    h = mix(h ^ total_);
    for (size_t i = 0; i < buffered_; ++i) h = mix(h ^ (uint64_t(buffer_[i]) + (uint64_t(i) << 8)));
    return mix(h);
  }

 private:
  static constexpr size_t kStripe = 32;
  static constexpr uint64_t kOdd1 = 0x9e3779b97f4a7c15ull, kOdd2 = 0xc2b2ae3d27d4eb4full;

  static uint64_t mix(uint64_t z) {  // splitmix64's finaliser
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  void stripe(const unsigned char* p) {
    for (int i = 0; i < 4; ++i) {
      uint64_t word;
      std::memcpy(&word, p + 8 * i, 8);
      lanes_[i] = std::rotl(lanes_[i] + word * kOdd2, 31) * kOdd1;
    }
  }

  uint64_t lanes_[4] = {kOdd1, kOdd2, 0x165667b19e3779f9ull, 0x27d4eb2f165667c5ull};
  unsigned char buffer_[kStripe] = {};
  size_t buffered_ = 0;
  uint64_t total_ = 0;
};

}  // namespace m1
