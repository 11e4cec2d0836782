#pragma once
// How a prompt is cut into prefill chunks. Cuts at multiples of the backend's prefill alignment
// (Backend::prefill_alignment) never change a sum, so a prompt prefilled in any such chunks, or
// resumed from a snapshot taken at such a cut, gives the same bits as in one piece. Both the
// engine and the one-sequence generation loop cut this way.

#include <cstdint>

namespace m1 {

// Where the chunk of a `length`-token prompt that starts at `pos` (< length) ends: at most
// `budget` (>= 1) tokens on, and not past `stop` when pos < stop. A chunk that does not finish the
// prompt ends at a multiple of `alignment`, unless the budget cannot reach one (its sums may then
// differ from another cut's by rounding). A final block of one token, which the kernels treat as a
// decode step, always runs alone: a prompt of length 1 mod alignment finishes with a one-token chunk.
int64_t prefill_chunk_end(int64_t pos, int64_t length, int64_t budget, int64_t alignment, int64_t stop = 0);

// The last cut of a `length`-token prompt at which a snapshot can be taken and resumed from, by
// this prompt or a longer one that starts with it, with at least its last token still to prefill
// (which gives the logits): the largest multiple of `alignment` below `length`, or 0 if none.
int64_t last_snapshot_point(int64_t length, int64_t alignment);

}  // namespace m1
