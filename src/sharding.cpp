#include "m1/sharding.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "m1/error.h"
#include "m1/quantize.h"

namespace m1 {
namespace {

// Uneven splits keep each rank's share a multiple of this where they can, so that rows of a
// column-split bf16 weight stay 16-byte aligned for vector loads.
constexpr int64_t kGranule = 8;
// ... and of this with quantized weights: a multiple of 8 and of every group size up to it.
constexpr int64_t kQuantizedGranule = 128;

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

namespace {

// The granule of an input dimension's split (see plan_shards).
int64_t input_granule(int64_t total, int world, int64_t group_size) {
  const int64_t least = group_size > 0 ? std::lcm(group_size, kGranule) : kGranule;
  int64_t g = kQuantizedGranule % least == 0 ? kQuantizedGranule : least;
  while (g > least && total / g < world) g /= 2;
  return g;
}

}  // namespace

ShardPlan plan_shards(const ModelConfig& c, int world, MoeParallel moe, int64_t group_size) {
  if (world < 1) fail("--tensor-parallel must be at least 1, got {}", world);
  const int64_t heads = c.num_attention_heads;
  if (heads % world != 0)
    fail("--tensor-parallel {} does not divide the model's {} attention heads (num_attention_heads)", world, heads);
  if (moe == MoeParallel::kExpert && c.num_local_experts % world != 0)
    fail("--tensor-parallel {} does not divide the model's {} experts (num_local_experts); use --moe-parallel tensor",
         world, c.num_local_experts);
  auto split = [&](int64_t total, const char* what, const char* field, int64_t by) {
    if (total < world) fail("--tensor-parallel {} is more than the model's {} {} ({})", world, total, what, field);
    return split_evenly(total, world, by);
  };
  const std::vector<Range> vocab = split(c.vocab_size, "vocabulary entries", "vocab_size", kGranule);
  const std::vector<Range> ffn = split(c.intermediate_size, "intermediate units", "intermediate_size",
                                       input_granule(c.intermediate_size, world, group_size));
  const std::vector<Range> shared_ffn =
      c.shared_intermediate_size > 0
          ? split(c.shared_intermediate_size, "shared intermediate units", "shared_intermediate_size",
                  input_granule(c.shared_intermediate_size, world, group_size))
          : std::vector<Range>(size_t(world));
  ShardPlan plan;
  plan.moe = moe;
  for (int r = 0; r < world; ++r) {
    RankShard s;
    s.rank = r;
    s.world = world;
    s.heads = {heads / world * r, heads / world};
    plan_kv_heads(c, s);
    s.shared_ffn = shared_ffn[size_t(r)];
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

namespace {

// Elements [from, from + count) of a packed or plain row into `to` at element `at`.
void copy_elements(const std::byte* from_row, int64_t from, int64_t count, DType t, std::byte* to_row, int64_t at) {
  const int64_t bits = dtype_bits(t);
  if (from * bits % 8 == 0 && at * bits % 8 == 0) {
    const int64_t whole = count * bits / 8;  // whole bytes; an int4 odd count leaves one code
    std::memcpy(to_row + at * bits / 8, from_row + from * bits / 8, size_t(whole));
    const int64_t done = whole * 8 / bits;
    from += done;
    at += done;
    count -= done;
  }
  for (int64_t i = 0; i < count; ++i) set_packed_code(to_row, t, at + i, packed_code(from_row, t, from + i));
}

std::unique_ptr<std::byte[]> zeroed(size_t bytes) { return std::make_unique<std::byte[]>(std::max<size_t>(bytes, 1)); }

}  // namespace

void check_group_split(const TensorSlice& slice, int64_t cols, int64_t group_size, const std::string& name) {
  if (slice.axis != TensorSlice::Axis::kColumns || group_size <= 0 || group_size >= cols) return;
  for (const Range& r : slice.ranges)
    if (r.begin % group_size != 0 || (r.count % group_size != 0 && r.end() != cols))
      fail("{}: the ranks' split of its {} inputs at column {} falls inside a quantization group of {} inputs", name, cols,
           r.begin % group_size != 0 ? r.begin : r.end(), group_size);
}

SlicedWeight slice_weight(const Weight& w, const TensorSlice& slice, const std::string& name) {
  const bool by_rows = slice.axis == TensorSlice::Axis::kRows;
  const int64_t extent = by_rows ? w.rows : w.cols;
  const bool grouped = w.quantized() && w.group_size < w.cols;  // else one scale per row
  int64_t kept = 0;
  for (const Range& r : slice.ranges) {
    if (r.begin < 0 || r.count < 0 || r.end() > extent)
      fail("{}: {} [{}, {}) outside its {}", name, by_rows ? "rows" : "columns", r.begin, r.end(), extent);
    kept += r.count;
  }
  if (grouped) check_group_split(slice, w.cols, w.group_size, name);
  SlicedWeight out;
  Weight& part = out.weight;
  part = w;
  if (by_rows) part.rows = kept;
  else part.cols = kept;
  if (w.quantized() && !grouped) part.group_size = part.cols;  // one scale per row still
  const size_t row_bytes = w.row_bytes(), scale_row = w.quantized() ? matrix_bytes(w.scale_dtype, 1, w.groups()) : 0;
  const auto* data = static_cast<const std::byte*>(w.data);
  const auto* scales = static_cast<const std::byte*>(w.scales);
  // One run of rows, or all the columns: a view into the source.
  if (slice.ranges.size() == 1 && (by_rows || slice.ranges[0] == Range{0, w.cols})) {
    const int64_t first = by_rows ? slice.ranges[0].begin : 0;
    part.data = data + size_t(first) * row_bytes;
    if (w.quantized()) part.scales = scales + size_t(first) * scale_row;
    return out;
  }
  // A float vector's run of columns: a view too.
  if (!w.quantized() && w.rows == 1 && slice.ranges.size() == 1) {
    part.data = data + size_t(slice.ranges[0].begin) * size_t(dtype_bits(w.dtype) / 8);
    return out;
  }
  out.data = zeroed(part.data_bytes());  // int4 padding stays u = 0
  const size_t part_row = part.row_bytes(), part_scale_row = part.quantized() ? matrix_bytes(w.scale_dtype, 1, part.groups()) : 0;
  if (part.quantized()) out.scales = zeroed(part.scale_bytes());
  if (by_rows) {
    int64_t to = 0;
    for (const Range& r : slice.ranges) {
      std::memcpy(out.data.get() + size_t(to) * part_row, data + size_t(r.begin) * row_bytes, size_t(r.count) * row_bytes);
      if (part.quantized())
        std::memcpy(out.scales.get() + size_t(to) * part_scale_row, scales + size_t(r.begin) * scale_row,
                    size_t(r.count) * scale_row);
      to += r.count;
    }
  } else {
    const size_t scale_size = w.quantized() ? size_t(dtype_bits(w.scale_dtype) / 8) : 0;
    for (int64_t row = 0; row < w.rows; ++row) {
      int64_t at = 0, group_at = 0;
      for (const Range& r : slice.ranges) {
        copy_elements(data + size_t(row) * row_bytes, r.begin, r.count, w.dtype, out.data.get() + size_t(row) * part_row, at);
        at += r.count;
        if (!part.quantized()) continue;
        // Scales: the range's groups (grouped), or the row's one scale.
        const int64_t g0 = grouped ? r.begin / w.group_size : 0;
        const int64_t gn = grouped ? (r.count + w.group_size - 1) / w.group_size : (group_at == 0 ? 1 : 0);
        std::memcpy(out.scales.get() + size_t(row) * part_scale_row + size_t(group_at) * scale_size,
                    scales + size_t(row) * scale_row + size_t(g0) * scale_size, size_t(gn) * scale_size);
        group_at += gn;
      }
    }
  }
  out.weight.data = out.data.get();
  if (part.quantized()) out.weight.scales = out.scales.get();
  return out;
}

}  // namespace m1
