#include "m1/sharding.h"

#include <cstring>

#include "m1/error.h"

namespace m1 {
namespace {

// Uneven splits keep each rank's share a multiple of this where they can, so that rows of a
// column-split bf16 weight stay 16-byte aligned for vector loads.
constexpr int64_t kGranule = 8;

// The KV heads a rank's query heads [h0, h0 + count) read, and how many local query heads share
// each (see RankShard::kv_heads).
void plan_kv_heads(const ModelConfig& c, RankShard& shard) {
  const int64_t group = c.num_attention_heads / c.num_key_value_heads;  // query heads per KV head
  const int64_t first = shard.heads.begin / group, last = (shard.heads.end() - 1) / group;
  const int64_t distinct = last - first + 1, count = shard.heads.count;
  bool regular = count % distinct == 0;
  for (int64_t j = 0; regular && j < count; ++j) regular = (shard.heads.begin + j) / group == first + j / (count / distinct);
  shard.kv_heads.clear();
  if (regular) {
    for (int64_t kv = first; kv <= last; ++kv) shard.kv_heads.push_back(kv);
    shard.kv_group = count / distinct;
  } else {
    for (int64_t j = 0; j < count; ++j) shard.kv_heads.push_back((shard.heads.begin + j) / group);
    shard.kv_group = 1;
  }
}

// Rows [begin * size, end * size) for each run of consecutive heads, in order.
std::vector<Range> head_rows(const std::vector<int64_t>& heads, int64_t size) {
  std::vector<Range> rows;
  for (int64_t h : heads) {
    if (!rows.empty() && rows.back().end() == h * size)
      rows.back().count += size;
    else
      rows.push_back({h * size, size});
  }
  return rows;
}

TensorSlice rows(std::vector<Range> r) { return {TensorSlice::Axis::kRows, std::move(r)}; }
TensorSlice columns(std::vector<Range> c) { return {TensorSlice::Axis::kColumns, std::move(c)}; }
Range scaled(Range r, int64_t by) { return {r.begin * by, r.count * by}; }

}  // namespace

MoeParallel parse_moe_parallel(const std::string& name) {
  if (name == "tensor") return MoeParallel::kTensor;
  if (name == "expert") return MoeParallel::kExpert;
  fail("MoE split '{}' is unknown (expected tensor or expert)", name);
}

std::string moe_parallel_name(MoeParallel mode) { return mode == MoeParallel::kTensor ? "tensor" : "expert"; }

std::vector<Range> split_evenly(int64_t total, int64_t parts, int64_t granule) {
  if (parts < 1 || total < parts) fail("cannot split {} into {} parts", total, parts);
  if (granule < 1 || total / granule < parts) granule = 1;
  const int64_t units = total / granule;
  std::vector<Range> ranges;
  int64_t begin = 0;
  for (int64_t p = 0; p < parts; ++p) {
    int64_t count = (units / parts + (p < units % parts ? 1 : 0)) * granule;
    if (p == parts - 1) count = total - begin;
    ranges.push_back({begin, count});
    begin += count;
  }
  return ranges;
}

ShardPlan plan_shards(const ModelConfig& c, int world, MoeParallel moe) {
  if (world < 1) fail("--tensor-parallel must be at least 1, got {}", world);
  const int64_t heads = c.num_attention_heads;
  if (heads % world != 0)
    fail("--tensor-parallel {} does not divide the model's {} attention heads (num_attention_heads)", world, heads);
  if (moe == MoeParallel::kExpert && c.num_local_experts % world != 0)
    fail("--tensor-parallel {} does not divide the model's {} experts (num_local_experts); use --moe-parallel tensor",
         world, c.num_local_experts);
  auto split = [&](int64_t total, const char* what, const char* field) {
    if (total < world) fail("--tensor-parallel {} is more than the model's {} {} ({})", world, total, what, field);
    return split_evenly(total, world, kGranule);
  };
  const std::vector<Range> vocab = split(c.vocab_size, "vocabulary entries", "vocab_size");
  const std::vector<Range> ffn = split(c.intermediate_size, "intermediate units", "intermediate_size");
  ShardPlan plan;
  plan.moe = moe;
  for (int r = 0; r < world; ++r) {
    RankShard s;
    s.rank = r;
    s.world = world;
    s.heads = {heads / world * r, heads / world};
    plan_kv_heads(c, s);
    s.shared_ffn = ffn[size_t(r)];
    if (moe == MoeParallel::kTensor) {
      s.ffn = ffn[size_t(r)];
      s.experts = {0, c.num_local_experts};
    } else {
      s.ffn = {0, c.intermediate_size};
      s.experts = {c.num_local_experts / world * r, c.num_local_experts / world};
    }
    s.vocab = vocab[size_t(r)];
    plan.ranks.push_back(std::move(s));
  }
  return plan;
}

std::optional<TensorSlice> rank_slice(const WeightSpec& spec, const ModelConfig& c, const RankShard& s) {
  using R = WeightRole;
  const int64_t d = c.head_dim;
  const Range heads = s.heads;
  auto expert_held = [&] { return spec.expert >= s.experts.begin && spec.expert < s.experts.end(); };
  switch (spec.role) {
    case R::kEmbed:
    case R::kLmHead: return rows({s.vocab});
    case R::kQkv: return rows({scaled(heads, 3 * d)});  // head i owns rows [3di, 3d(i+1)): its q, k, v
    case R::kOutputGate:
    case R::kQ: return rows({scaled(heads, d)});
    case R::kAttnNorm:
    case R::kOutProj:
    case R::kO: return columns({scaled(heads, d)});
    case R::kK:
    case R::kV: return rows(head_rows(s.kv_heads, d));
    case R::kW1:
    case R::kW3:
      if (!expert_held()) return std::nullopt;
      return rows({s.ffn});
    case R::kW2:
      if (!expert_held()) return std::nullopt;
      return columns({s.ffn});
    case R::kSharedGate:
    case R::kSharedUp: return rows({s.shared_ffn});
    case R::kSharedDown: return columns({s.shared_ffn});
    case R::kFinalNorm:
    case R::kInputNorm:
    case R::kPostNorm:
    case R::kRouter:
    case R::kCoefficient: break;
  }
  // Replicated: every row.
  return rows({{0, spec.shape.size() == 2 ? spec.shape[0] : 1}});
}

SlicedTensor slice_tensor(const TensorView& t, const TensorSlice& slice) {
  const bool matrix = t.shape.size() == 2;
  const int64_t rows = matrix ? t.shape[0] : 1, cols = t.shape.empty() ? 1 : t.shape.back();
  const bool by_rows = slice.axis == TensorSlice::Axis::kRows;
  const int64_t extent = by_rows ? rows : cols;
  int64_t kept = 0;
  for (const Range& r : slice.ranges) {
    if (r.begin < 0 || r.count < 0 || r.end() > extent)
      fail("{} in {}: {} [{}, {}) outside its {}", t.name, t.file, by_rows ? "rows" : "columns", r.begin, r.end(), extent);
    kept += r.count;
  }
  const size_t element = rows * cols > 0 ? t.nbytes / size_t(rows * cols) : 0;
  SlicedTensor out;
  out.view = t;
  const int64_t out_rows = by_rows ? kept : rows, out_cols = by_rows ? cols : kept;
  if (matrix) out.view.shape = {out_rows, out_cols};
  else out.view.shape = {out_cols};
  out.view.nbytes = size_t(out_rows * out_cols) * element;
  const size_t row_bytes = size_t(cols) * element;
  // One run of rows, or of the columns of one row, or all the columns: a view into the stored bytes.
  if (slice.ranges.size() == 1 && (by_rows || rows == 1 || slice.ranges[0] == Range{0, cols})) {
    const Range r = slice.ranges[0];
    out.view.data = t.data + (by_rows ? size_t(r.begin) * row_bytes : size_t(r.begin) * element);
    return out;
  }
  out.storage = std::make_unique<std::byte[]>(std::max<size_t>(out.view.nbytes, 1));
  std::byte* to = out.storage.get();
  if (by_rows) {
    for (const Range& r : slice.ranges) {
      std::memcpy(to, t.data + size_t(r.begin) * row_bytes, size_t(r.count) * row_bytes);
      to += size_t(r.count) * row_bytes;
    }
  } else {
    for (int64_t row = 0; row < rows; ++row)
      for (const Range& r : slice.ranges) {
        std::memcpy(to, t.data + size_t(row) * row_bytes + size_t(r.begin) * element, size_t(r.count) * element);
        to += size_t(r.count) * element;
      }
  }
  out.view.data = out.storage.get();
  return out;
}

}  // namespace m1
