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

#include "m1/backend.h"
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
// `group_size`: the inputs per scale of quantized weights (0: none, or one scale per row). Uneven
// splits of a row-parallel product's input (each expert's and the shared MLP's intermediate size)
// keep every rank's share a multiple of 128 (of the group size where that does not divide 128),
// halved while the dimension is too small for it, never below lcm(8, group size): so that N ranks
// hold exactly the codes and scales one rank holds. A dimension too small even for that falls
// back to 1, and loading the quantized weights then fails naming the column and the group.
ShardPlan plan_shards(const ModelConfig& config, int world, MoeParallel moe = MoeParallel::kTensor,
                      int64_t group_size = 0);

// The part of a stored tensor a rank holds: ranges of its rows, or of its columns (a vector's
// only axis counts as columns), concatenated in order.
struct TensorSlice {
  enum class Axis { kRows, kColumns } axis = Axis::kRows;
  std::vector<Range> ranges;
};

// The part of `spec`'s tensor `shard`'s rank holds: nullopt when it holds none of it (an expert
// held by another rank); the whole tensor when it is replicated.
std::optional<TensorSlice> rank_slice(const WeightSpec& spec, const ModelConfig& config, const RankShard& shard);

// A weight cut to a rank's part, before upload: the Weight, and the bytes it points into when they
// had to be copied (columns, or rows from several places); one run of rows is a view into the
// source. The one place weights are cut. A quantized weight is cut alike: rows take their scale
// rows, and columns take the scales of their groups, so each column range must start on a
// quantization group (and end on one, or at the last column): a cut inside a group is an error
// naming the column and the group size. A weight with one scale per row keeps its rows' scales.
// Throws that error unless every column range of `slice` falls on groups of `group_size` inputs
// of `cols` (group_size 0 or cols: one scale per row, any range).
void check_group_split(const TensorSlice& slice, int64_t cols, int64_t group_size, const std::string& name);
struct SlicedWeight {
  Weight weight;
  std::unique_ptr<std::byte[]> data, scales;
};
// `name` names the tensor in errors.
SlicedWeight slice_weight(const Weight& weight, const TensorSlice& slice, const std::string& name);

}  // namespace m1
