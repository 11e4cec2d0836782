#pragma once
// How a model is split across the ranks of a tensor-parallel group (DESIGN.md §2, "Sharding"):
// the part of every weight each rank holds and the shape of each rank's share of the work. The
// head count must divide by the number of ranks; the sizes it need not divide (an expert's
// intermediate size, the vocabulary) are split unevenly.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "m1/config.h"
#include "m1/safetensors.h"
#include "m1/weights.h"

namespace m1 {

// The MoE's split: each expert's intermediate dimension over the ranks (tensor), or whole experts
// per rank (expert). Either way the router is replicated and runs in fp32, so every rank routes
// every token alike, and the ranks' partial outputs meet in an all-reduce.
enum class MoeParallel { kTensor, kExpert };
MoeParallel parse_moe_parallel(const std::string& name);  // "tensor" or "expert"; throws m1::Error
std::string moe_parallel_name(MoeParallel mode);

struct ShardOptions {
  MoeParallel moe = MoeParallel::kTensor;
};

struct Range {
  int64_t begin = 0, count = 0;
  int64_t end() const { return begin + count; }
  bool operator==(const Range&) const = default;
};

// `total` in `parts` consecutive ranges whose sizes differ by at most `granule`: each a multiple
// of it but the last, which takes the remainder. A granule larger than total / parts falls back
// to 1. Throws m1::Error when total < parts.
std::vector<Range> split_evenly(int64_t total, int64_t parts, int64_t granule = 1);

// One rank's part of the model.
struct RankShard {
  int rank = 0, world = 1;
  Range heads;  // lightning heads and softmax query heads
  // The KV heads its softmax layers compute, in order: local query head j reads local KV head
  // j / kv_group. Where the rank's query heads read whole groups or lie in one group, they are
  // the KV heads those heads read; otherwise each query head gets its own copy of its KV head.
  std::vector<int64_t> kv_heads;
  int64_t kv_group = 1;
  Range ffn;         // of each expert's intermediate dimension (the whole of it, expert parallel)
  Range experts;     // the experts held (all of them, tensor parallel)
  Range shared_ffn;  // of the shared MLP's intermediate dimension
  Range vocab;       // rows of the embedding table and the LM head
};

struct ShardPlan {
  MoeParallel moe = MoeParallel::kTensor;
  std::vector<RankShard> ranks;
};

// Throws m1::Error naming both numbers when `world` does not divide the attention heads (or,
// expert parallel, the experts), or exceeds a dimension it splits.
ShardPlan plan_shards(const ModelConfig& config, int world, MoeParallel moe = MoeParallel::kTensor);

// The part of a stored tensor a rank holds: ranges of its rows, or of its columns (a vector's
// only axis counts as columns), concatenated in order.
struct TensorSlice {
  enum class Axis { kRows, kColumns } axis = Axis::kRows;
  std::vector<Range> ranges;
};

// The part of `spec`'s tensor `shard`'s rank holds: nullopt when it holds none of it (an expert
// held by another rank); the whole tensor when it is replicated.
std::optional<TensorSlice> rank_slice(const WeightSpec& spec, const ModelConfig& config, const RankShard& shard);

// A tensor cut to a rank's part, before upload: its view, and the bytes the view points into when
// they had to be copied (columns, or rows from several places); one run of rows is a view into
// the stored bytes. The one place weights are cut: a quantized tensor will be cut alike, its
// per-row scales by the same row ranges and its per-group scales by the column ranges' groups.
struct SlicedTensor {
  TensorView view;
  std::unique_ptr<std::byte[]> storage;
};
SlicedTensor slice_tensor(const TensorView& tensor, const TensorSlice& slice);

}  // namespace m1
