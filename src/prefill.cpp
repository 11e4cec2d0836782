#include "m1/prefill.h"

#include <algorithm>

namespace m1 {

int64_t prefill_chunk_end(int64_t pos, int64_t length, int64_t budget, int64_t alignment, int64_t stop) {
  int64_t end = std::min(length, pos + budget);
  if (stop > pos) end = std::min(end, stop);
  if (end < length) {
    const int64_t aligned = end / alignment * alignment;
    return aligned > pos ? aligned : end;
  }
  // The last token alone when it starts a block of its own (and the chunk holds more than it).
  if (alignment > 1 && length - pos > 1 && (length - 1) % alignment == 0) return length - 1;
  return end;
}

int64_t last_snapshot_point(int64_t length, int64_t alignment) { return (length - 1) / alignment * alignment; }

}  // namespace m1
