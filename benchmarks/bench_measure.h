#pragma once
// Timing one model at one context length: chunked prefill as the server runs it, then decode one
// token at a time at that depth, repeated after a warm-up.

#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

#include "m1/model.h"

namespace m1::bench {

struct MeasureSpec {
  int64_t context = 0;  // the depth at which decode is timed
  // 0: time the prefill of the context itself. Otherwise build the context untimed, then time
  // prefilling this many more tokens after it (llama-bench's "pp512 at depth d").
  int64_t extra_prefill = 0;
  int64_t decode_tokens = 1;
  int64_t repeats = 1;
  int64_t prefill_chunk = 512;
  // Sequences decoded together, each one token per step, all at depth `context` (a server's
  // continuous batch): decode_ms_per_token is then the step's time, and tokens/s counts them all.
  int64_t decode_batch = 1;
};

struct Measurement {
  int64_t context = 0;
  int64_t prefill_tokens = 0;                // tokens in the timed prefill
  int64_t decode_batch = 1;                  // sequences per decode step
  std::vector<double> prefill_ms;            // one per repeat
  std::vector<double> decode_ms_per_token;   // one per repeat: the median over its decode steps
  uint64_t state_bytes = 0;                  // one sequence's state at depth `context`
  std::string kv_dtype;                      // the type its KV cache holds ("F32", "BF16")
  uint64_t peak_rss_bytes = 0;               // filled in by whoever owns the process
  // Per repeat: the share of the wall time the ranks spent in collectives (waiting for peers
  // included), averaged over ranks; 0 for one rank.
  std::vector<double> prefill_collective_share, decode_collective_share;
};
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(Measurement, context, prefill_tokens, decode_batch, prefill_ms, decode_ms_per_token,
                                   state_bytes, kv_dtype, peak_rss_bytes, prefill_collective_share, decode_collective_share)

// The figures a measurement reports: medians over its repeats. decode_tokens_per_s counts every
// sequence of a decode batch.
struct Summary {
  double prefill_ms = 0, prefill_tokens_per_s = 0, decode_ms_per_token = 0, decode_tokens_per_s = 0;
  double prefill_collective_share = 0, decode_collective_share = 0;
};
Summary summarize(const Measurement& m);

double median(std::vector<double> values);

Measurement measure(Model& model, const MeasureSpec& spec);

}  // namespace m1::bench
