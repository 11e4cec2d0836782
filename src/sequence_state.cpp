// The portable form of a sequence's state (SequenceState::save_* / append_kv / load_lightning):
// sizes and ranges checked once here, the copies left to each backend's state.

#include "m1/backend.h"
#include "m1/error.h"

namespace m1 {

void SequenceState::save_lightning(std::span<std::byte> out) const {
  if (out.size() != lightning_bytes())
    fail("state snapshot: {} bytes given for {} bytes of lightning states", out.size(), lightning_bytes());
  if (!out.empty()) read_lightning(out.data());
}

void SequenceState::save_kv(int64_t begin, int64_t end, std::span<std::byte> out) const {
  if (begin < 0 || begin > end || end > length_)
    fail("state snapshot: KV rows [{}, {}) are not within the {} tokens held", begin, end, length_);
  if (out.size() != kv_bytes(end - begin))
    fail("state snapshot: {} bytes given for {} bytes of KV rows", out.size(), kv_bytes(end - begin));
  if (!out.empty()) read_kv(begin, end, out.data());
}

void SequenceState::append_kv(std::span<const std::byte> rows, int64_t tokens) {
  if (tokens < 0) fail("state restore: {} tokens of KV rows", tokens);
  if (rows.size() != kv_bytes(tokens))
    fail("state restore: {} bytes of KV rows for {} tokens, which take {}", rows.size(), tokens, kv_bytes(tokens));
  if (tokens > 0 && kv_bytes(1) > 0) write_kv(rows.data(), tokens);
  length_ += tokens;
}

void SequenceState::load_lightning(std::span<const std::byte> in) {
  if (in.size() != lightning_bytes())
    fail("state restore: {} bytes given for {} bytes of lightning states", in.size(), lightning_bytes());
  if (!in.empty()) write_lightning(in.data());
}

}  // namespace m1
