// Tensor parallelism on CPU ranks: the sharding plan and the cutting of weights, the shared-memory
// collectives, and the correctness matrix: split over N ranks, the golden models still match
// their float64 references in exact precision, greedy output is the same at every N, batching
// changes no logit, and a rank that fails stops the step instead of hanging it.

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <thread>

#include <fmt/format.h>

#include "cpu/moe.h"
#include "cpu/numa.h"
#include "cpu/shared_memory_group.h"
#include "forwarding_backend.h"
#include "golden_support.h"
#include "m1/model.h"
#include "m1/quantize.h"
#include "m1/state_snapshot.h"
#include "m1/sharding.h"
#include "m1/synthetic.h"
#include "m1/weights.h"
#include "test_support.h"

namespace m1 {
namespace {

// LoadOptions with only the MoE split, or only the quantization, set.
LoadOptions sharded_load(MoeParallel moe) {
  LoadOptions o;
  o.shard = ShardOptions{moe};
  return o;
}
LoadOptions quantized_load(const QuantScheme& scheme) {
  LoadOptions o;
  o.quantize = scheme;
  return o;
}

using testing::relative_error;

constexpr double kExactBound = 1e-4;

// A model split over `ranks` CPU ranks, with the backends it runs on.
struct Group {
  std::vector<std::unique_ptr<Backend>> backends;
  std::unique_ptr<Model> model;  // after backends_: destroyed first
};

BackendOptions cpu_ranks(int ranks, Precision precision = Precision::kExact) {
  BackendOptions o{"cpu", 2, precision};
  o.tensor_parallel = ranks;
  return o;
}

Group load_group(const std::string& dir, int ranks, MoeParallel moe = MoeParallel::kTensor) {
  Group g;
  g.backends = create_backends(cpu_ranks(ranks));
  g.model = Model::load(dir, rank_pointers(g.backends), sharded_load(moe));
  return g;
}

Group random_group(const ModelConfig& config, int ranks, MoeParallel moe = MoeParallel::kTensor, uint64_t seed = 5) {
  Group g;
  g.backends = create_backends(cpu_ranks(ranks));
  g.model = std::make_unique<Model>(config, random_checkpoint(config, DType::kBF16, seed), rank_pointers(g.backends),
                                    sharded_load(moe));
  return g;
}

// The tiny preset reshaped: heads x head_dim, KV heads, experts.
ModelConfig shaped(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t experts = 4) {
  ModelConfig c = preset("tiny").config;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.head_dim = head_dim;
  c.rotary_dim = head_dim / 2;
  c.num_local_experts = experts;
  c.intermediate_size = 52;  // not a multiple of 8 ranks: split unevenly
  c.vocab_size = 701;
  c.num_hidden_layers = 3;
  c.attn_type_list = {0, 1, 0};
  return parse_config(config_to_json(c), "test config");
}

// Greedy tokens after `prompt`, one decode step each.
std::vector<int32_t> greedy(Model& model, std::vector<int32_t> feed, size_t count) {
  auto seq = model.new_sequence();
  StepLogits out;
  std::vector<int32_t> generated;
  for (size_t i = 0; i < count; ++i) {
    BatchEntry e{seq.get(), feed, LogitsFor::kLast};
    model.forward({&e, 1}, out);
    auto row = out.row(0, 0);
    const int32_t best = int32_t(std::max_element(row.begin(), row.end()) - row.begin());
    generated.push_back(best);
    feed = {best};
  }
  return generated;
}

// --- The plan and the cutting of weights ---------------------------------------------------

TEST(Sharding, SplitsEvenlyInGranules) {
  EXPECT_EQ(split_evenly(10, 3), (std::vector<Range>{{0, 4}, {4, 3}, {7, 3}}));
  // 9216 / 8 and the vocabulary / 8 split exactly; 100 in granules of 8 leaves the rest to the last.
  for (const Range& r : split_evenly(9216, 8, 8)) EXPECT_EQ(r.count, 1152);
  EXPECT_EQ(split_evenly(100, 3, 8), (std::vector<Range>{{0, 32}, {32, 32}, {64, 36}}));
  EXPECT_EQ(split_evenly(20, 3, 8), (std::vector<Range>{{0, 7}, {7, 7}, {14, 6}}));  // too small for granules
  testing::expect_error([] { split_evenly(2, 3); }, {"2", "3"});
}

TEST(Sharding, KvHeadsFollowTheQueryHeads) {
  // 6 heads reading 2 KV heads (3 each), over 3 ranks: rank 1's heads 2 and 3 read KV heads 0 and 1.
  ShardPlan plan = plan_shards(shaped(6, 2, 8), 3);
  EXPECT_EQ(plan.ranks[0].kv_heads, (std::vector<int64_t>{0}));
  EXPECT_EQ(plan.ranks[0].kv_group, 2);
  EXPECT_EQ(plan.ranks[1].kv_heads, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(plan.ranks[1].kv_group, 1);
  EXPECT_EQ(plan.ranks[2].kv_heads, (std::vector<int64_t>{1}));
  // 6 heads reading 3 KV heads over 2 ranks: heads 0-2 read KV 0, 0, 1, which no grouping serves,
  // so each query head gets its own copy of its KV head.
  plan = plan_shards(shaped(6, 3, 8), 2);
  EXPECT_EQ(plan.ranks[0].kv_heads, (std::vector<int64_t>{0, 0, 1}));
  EXPECT_EQ(plan.ranks[1].kv_heads, (std::vector<int64_t>{1, 2, 2}));
  EXPECT_EQ(plan.ranks[1].kv_group, 1);
  // The real model's 64 heads and 8 KV heads: 8 ranks split the KV heads, 16 share them.
  plan = plan_shards(shaped(64, 8, 4), 8);
  EXPECT_EQ(plan.ranks[3].kv_heads, (std::vector<int64_t>{3}));
  EXPECT_EQ(plan.ranks[3].kv_group, 8);
  plan = plan_shards(shaped(64, 8, 4), 16);
  EXPECT_EQ(plan.ranks[5].kv_heads, (std::vector<int64_t>{2}));  // heads 20-23
  EXPECT_EQ(plan.ranks[5].kv_group, 4);
}

TEST(Sharding, RefusesWhatTheRanksDoNotDivide) {
  testing::expect_error([] { plan_shards(shaped(6, 2, 8), 4); }, {"--tensor-parallel 4", "6 attention heads"});
  testing::expect_error([] { plan_shards(shaped(8, 2, 8, 6), 4, MoeParallel::kExpert); },
                        {"--tensor-parallel 4", "6 experts"});
  EXPECT_NO_THROW(plan_shards(shaped(8, 2, 8, 6), 4, MoeParallel::kTensor));  // experts need not divide then
  ModelConfig small = shaped(8, 2, 8);
  small.vocab_size = 4;
  testing::expect_error([&] { plan_shards(small, 8); }, {"--tensor-parallel 8", "4 vocabulary entries"});
}

// A [3, 5] F32 tensor whose element (r, c) is 10r + c.
// A [rows, cols] F32 weight whose element (r, c) is 10r + c.
struct NumberedWeight {
  std::vector<float> values;
  Weight weight;
  NumberedWeight(int64_t rows = 3, int64_t cols = 5) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) values.push_back(float(10 * r + c));
    weight = Weight{values.data(), DType::kF32, rows, cols};
  }
};

std::vector<float> floats(const Weight& w) {
  const auto* p = static_cast<const float*>(w.data);
  return {p, p + w.rows * w.cols};
}

TEST(Sharding, CutsRowsAndColumns) {
  NumberedWeight t;
  using Axis = TensorSlice::Axis;
  SlicedWeight rows = slice_weight(t.weight, {Axis::kRows, {{1, 2}}}, "t");
  EXPECT_EQ(rows.data, nullptr);  // one run of rows: a view
  EXPECT_EQ(rows.weight.rows, 2);
  EXPECT_EQ(floats(rows.weight), (std::vector<float>{10, 11, 12, 13, 14, 20, 21, 22, 23, 24}));
  SlicedWeight columns = slice_weight(t.weight, {Axis::kColumns, {{3, 2}}}, "t");
  EXPECT_NE(columns.data, nullptr);
  EXPECT_EQ(columns.weight.cols, 2);
  EXPECT_EQ(floats(columns.weight), (std::vector<float>{3, 4, 13, 14, 23, 24}));
  SlicedWeight gathered = slice_weight(t.weight, {Axis::kRows, {{2, 1}, {0, 1}, {2, 1}}}, "t");
  EXPECT_EQ(floats(gathered.weight), (std::vector<float>{20, 21, 22, 23, 24, 0, 1, 2, 3, 4, 20, 21, 22, 23, 24}));
  // A vector's only axis is its columns: a run of them is a view.
  NumberedWeight vector(1, 6);
  SlicedWeight part = slice_weight(vector.weight, {Axis::kColumns, {{2, 3}}}, "v");
  EXPECT_EQ(part.data, nullptr);
  EXPECT_EQ(floats(part.weight), (std::vector<float>{2, 3, 4}));
  testing::expect_error([&] { slice_weight(t.weight, {Axis::kColumns, {{4, 2}}}, "t"); }, {"t", "columns [4, 6)", "5"});
}

// Quantized weights are cut with their scales: rows with their scale rows, columns on groups with
// the groups' scales (one scale per row: the row's scale), codes exactly those of the whole.
TEST(Sharding, CutsQuantizedWeightsWithTheirScales) {
  std::vector<float> values;
  const int64_t rows = 5, cols = 96;
  for (int64_t i = 0; i < rows * cols; ++i) values.push_back(std::sin(float(i) * 0.37f));
  const Weight source{values.data(), DType::kF32, rows, cols};
  using Axis = TensorSlice::Axis;
  for (const QuantScheme scheme : {QuantScheme{DType::kQ4, 32}, QuantScheme{DType::kQ8, 0}}) {
    const QuantizedWeight whole = quantize(source, scheme, "w");
    const Weight& w = whole.weight();
    for (const TensorSlice& slice : {TensorSlice{Axis::kRows, {{3, 2}, {0, 1}}}, TensorSlice{Axis::kColumns, {{32, 64}}},
                                     TensorSlice{Axis::kColumns, {{64, 32}, {0, 32}}}}) {
      const SlicedWeight part = slice_weight(w, slice, "w");
      int64_t at = 0;
      for (const Range& r : slice.ranges)
        for (int64_t i = 0; i < r.count; ++i, ++at)
          for (int64_t j = 0; j < (slice.axis == Axis::kRows ? cols : rows); ++j) {
            const bool by_rows = slice.axis == Axis::kRows;
            const int64_t pr = by_rows ? at : j, pc = by_rows ? j : at;
            const int64_t wr = by_rows ? r.begin + i : j, wc = by_rows ? j : r.begin + i;
            ASSERT_EQ(weight_value(part.weight, pr, pc), weight_value(w, wr, wc))
                << dtype_name(scheme.type) << " element (" << pr << ", " << pc << ")";
          }
    }
  }
  const QuantizedWeight int4 = quantize(source, QuantScheme{DType::kQ4, 32}, "w");
  testing::expect_error([&] { slice_weight(int4.weight(), {Axis::kColumns, {{16, 48}}}, "w"); },
                        {"w", "96 inputs", "column 16", "group of 32"});
}

// Every rank's part of every weight, put back together, is the whole tensor.
TEST(Sharding, RanksHoldEveryWeightOnce) {
  const ModelConfig c = shaped(6, 2, 8, 6);
  for (MoeParallel moe : {MoeParallel::kTensor, MoeParallel::kExpert}) {
    const ShardPlan plan = plan_shards(c, 3, moe);
    for (const WeightSpec& spec : weight_specs(c)) {
      int64_t rows = 0, cols = 0, holders = 0;
      for (const RankShard& shard : plan.ranks) {
        const std::optional<TensorSlice> slice = rank_slice(spec, c, shard);
        if (!slice) continue;
        ++holders;
        int64_t kept = 0;
        for (const Range& r : slice->ranges) kept += r.count;
        (slice->axis == TensorSlice::Axis::kRows ? rows : cols) += kept;
      }
      const int64_t stored_rows = spec.shape.size() == 2 ? spec.shape[0] : 1;
      const bool replicated = spec.role == WeightRole::kRouter || (is_norm(spec.role) && spec.role != WeightRole::kAttnNorm);
      const bool kv = spec.role == WeightRole::kK || spec.role == WeightRole::kV;
      if (replicated) {
        EXPECT_EQ(rows, 3 * stored_rows) << spec.name;
      } else if (kv) {
        EXPECT_GE(rows, stored_rows) << spec.name;  // ranks sharing a KV head each compute it
      } else if (moe == MoeParallel::kExpert && spec.expert >= 0) {
        EXPECT_EQ(holders, 1) << spec.name;
      } else {
        EXPECT_EQ(rows + cols, rows > 0 ? stored_rows : spec.shape.back()) << spec.name;
      }
    }
  }
}

// The real MiniMax-M1 over 8 ranks, from its config.json alone: what each rank holds, in BF16, and
// with int8 experts (one bf16 scale per row) or int8 everywhere but the router and the norms. The
// rank must fit an H200 (141 GB) in BF16, and an H100 (80 GB) with int8 experts, leaving room for
// sequence state.
TEST(Sharding, RealModelOverEightRanks) {
  const ModelConfig c = load_config(std::filesystem::path(M1_SOURCE_DIR) / "data/minimax-m1/config.json");
  const ShardPlan plan = plan_shards(c, 8);
  for (const RankShard& shard : plan.ranks) {
    double experts = 0, expert_rows = 0, rest = 0, rest_rows = 0, small = 0;
    for (const WeightSpec& spec : weight_specs(c)) {
      const std::optional<TensorSlice> slice = rank_slice(spec, c, shard);
      if (!slice) continue;
      int64_t kept = 0;
      for (const Range& r : slice->ranges) kept += r.count;
      const int64_t rows = spec.shape.size() == 2 ? spec.shape[0] : 1;
      const double held_rows = slice->axis == TensorSlice::Axis::kRows ? double(kept) : double(rows);
      const double elements = held_rows * double(slice->axis == TensorSlice::Axis::kRows ? spec.shape.back() : kept);
      if (spec.expert >= 0) {
        experts += elements, expert_rows += held_rows;
      } else if (spec.role == WeightRole::kRouter || is_norm(spec.role)) {
        small += elements;
      } else {
        rest += elements, rest_rows += held_rows;
      }
    }
    const double bf16 = 2 * (experts + rest + small), int8_experts = experts + 2 * expert_rows + 2 * (rest + small);
    const double int8 = experts + rest + 2 * (expert_rows + rest_rows + small);
    if (shard.rank == 0)
      std::printf("MiniMax-M1 over 8 ranks, rank 0: %.2fB parameters; %.1f GB in BF16, %.1f GB with int8 experts, "
                  "%.1f GB int8 everywhere but router and norms\n",
                  (experts + rest + small) / 1e9, bf16 / 1e9, int8_experts / 1e9, int8 / 1e9);
    EXPECT_LT(bf16, 120e9) << "rank " << shard.rank;
    EXPECT_LT(int8_experts, 62e9) << "rank " << shard.rank;
  }
}

TEST(Numa, ReadsNodesAndPlacesRanks) {
  EXPECT_EQ(cpu::parse_cpu_list("0-3,8,10-11\n"), (std::vector<int>{0, 1, 2, 3, 8, 10, 11}));
  testing::expect_error([] { cpu::parse_cpu_list("0-x"); }, {"0-x", "x"});
  const std::filesystem::path root = std::filesystem::temp_directory_path() / "m1_numa_test";
  std::filesystem::remove_all(root);
  for (auto [node, cpus] : {std::pair{"node0", "0-3"}, std::pair{"node1", "4-7"}, std::pair{"nodeX", "9"}}) {
    std::filesystem::create_directories(root / node);
    std::ofstream(root / node / "cpulist") << cpus << "\n";
  }
  const std::vector<cpu::NumaNode> nodes = cpu::numa_nodes(root);
  std::filesystem::remove_all(root);
  ASSERT_EQ(nodes.size(), 2u);
  EXPECT_EQ(nodes[1].cpus, (std::vector<int>{4, 5, 6, 7}));
  // Four ranks on two nodes: two per node, each on half its cores.
  const auto placed = cpu::place_ranks(nodes, 4, 0);
  EXPECT_EQ(placed[0].node, 0);
  EXPECT_EQ(placed[1].node, 1);
  EXPECT_EQ(placed[2].cpus, (std::vector<int>{2, 3}));
  EXPECT_EQ(placed[3].cpus, (std::vector<int>{6, 7}));
  EXPECT_EQ(placed[3].threads, 2);
  // One node: nothing pinned, the threads shared out.
  const auto flat = cpu::place_ranks({nodes[0]}, 2, 6);
  EXPECT_TRUE(flat[1].cpus.empty());
  EXPECT_EQ(flat[1].threads, 3);
}

// Expert parallel on the CPU: a rank's experts' share of each row, from the fast kernel as from
// the reference, and the shares of a partition of the experts add up to the whole layer.
TEST(CpuMoe, HeldExpertsAddUpToTheLayer) {
  const int64_t experts = 6, hidden = 24, ffn = 20, rows = 9;
  std::vector<std::vector<float>> storage;
  auto matrix = [&](int64_t r, int64_t c) {
    storage.push_back(testing::random_floats(size_t(r * c), 1.0f / std::sqrt(float(c))));
    return Weight{storage.back().data(), DType::kF32, r, c};
  };
  storage.reserve(64);
  MoeWeights whole;
  whole.router = matrix(experts, hidden);
  whole.top_k = 2;
  for (int64_t e = 0; e < experts; ++e) {
    whole.w1.push_back(matrix(ffn, hidden));
    whole.w3.push_back(matrix(ffn, hidden));
    whole.w2.push_back(matrix(hidden, ffn));
  }
  std::vector<float> x = testing::random_floats(size_t(rows * hidden));
  cpu::ThreadPool pool(2);
  cpu::MoeScratch scratch;
  std::vector<float> all(x.size()), sum(x.size(), 0.0f);
  cpu::moe(pool, Mat{x.data(), rows, hidden}, whole, Mat{all.data(), rows, hidden}, cpu::Operands::kFp32, scratch);
  for (auto [first, held] : {std::pair<int64_t, int64_t>{0, 2}, {2, 3}, {5, 1}}) {
    MoeWeights part = whole;
    part.first_expert = first;
    for (auto* list : {&part.w1, &part.w3, &part.w2})
      *list = std::vector<Weight>(list->begin() + first, list->begin() + first + held);
    std::vector<float> fast(x.size()), reference(x.size());
    cpu::moe(pool, Mat{x.data(), rows, hidden}, part, Mat{fast.data(), rows, hidden}, cpu::Operands::kFp32, scratch);
    cpu::moe_reference(Mat{x.data(), rows, hidden}, part, Mat{reference.data(), rows, hidden}, cpu::Operands::kFp32);
    EXPECT_LT(relative_error(fast, reference), 1e-5) << "experts " << first << " to " << first + held - 1;
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += fast[i];
  }
  EXPECT_LT(relative_error(sum, all), 1e-5);
}

// --- The shared-memory collectives -----------------------------------------------------------

// fn(rank) on `world` threads at once.
void on_threads(int world, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) threads.emplace_back(fn, r);
  for (auto& t : threads) t.join();
}

TEST(SharedMemoryGroup, SumsInRankOrderForEveryRank) {
  for (int world : {2, 3, 8})
    for (int64_t count : {int64_t(0), int64_t(1), int64_t(7), int64_t(40009)}) {
      std::vector<std::vector<float>> data(static_cast<size_t>(world));
      for (auto& d : data) d = testing::random_floats(size_t(count), 1e3f);
      std::vector<float> want(static_cast<size_t>(count));
      for (int64_t i = 0; i < count; ++i) {
        float s = data[0][size_t(i)];
        for (int r = 1; r < world; ++r) s += data[size_t(r)][size_t(i)];
        want[size_t(i)] = s;
      }
      cpu::SharedMemoryGroup group(world);
      on_threads(world, [&](int r) {
        cpu::ThreadPool pool(r % 2 + 1);
        group.all_reduce_sum(r, data[size_t(r)].data(), count, pool);
        group.all_reduce_sum(r, data[size_t(r)].data(), 0, pool);  // back to back, and empty
      });
      for (int r = 0; r < world && count > 0; ++r)
        EXPECT_EQ(std::memcmp(data[size_t(r)].data(), want.data(), size_t(count) * sizeof(float)), 0)
            << "rank " << r << " of " << world << ", " << count << " elements";
    }
}

TEST(SharedMemoryGroup, GathersColumnsOnRankZero) {
  const std::vector<int64_t> widths{3, 1, 2};
  const int64_t rows = 2;
  std::vector<std::vector<float>> parts(3);
  for (int r = 0; r < 3; ++r)
    for (int64_t i = 0; i < rows * widths[size_t(r)]; ++i) parts[size_t(r)].push_back(float(100 * r + i));
  std::vector<float> out(size_t(rows * 6), -1);
  cpu::SharedMemoryGroup group(3);
  on_threads(3, [&](int r) { group.gather_columns(r, parts[size_t(r)].data(), rows, widths, r == 0 ? out.data() : nullptr); });
  EXPECT_EQ(out, (std::vector<float>{0, 1, 2, 100, 200, 201, 3, 4, 5, 101, 202, 203}));
}

TEST(SharedMemoryGroup, AbortedGroupFailsInsteadOfWaiting) {
  cpu::SharedMemoryGroup group(3);
  std::atomic<int> failed{0};
  on_threads(3, [&](int r) {
    cpu::ThreadPool pool(1);
    std::vector<float> data(10, 1.0f);
    if (r == 2) {
      group.abort("rank 2 failed: out of luck");
      return;
    }
    try {
      group.all_reduce_sum(r, data.data(), 10, pool);
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("rank 2 failed: out of luck"), std::string::npos) << e.what();
      ++failed;
    }
  });
  EXPECT_EQ(failed.load(), 2);
}

// --- The correctness matrix ----------------------------------------------------------------

struct GoldenCase {
  std::string model;
  int ranks;
  MoeParallel moe;
};

std::string case_name(const ::testing::TestParamInfo<GoldenCase>& info) {
  std::string name = info.param.model + "_" + std::to_string(info.param.ranks) + "_" + moe_parallel_name(info.param.moe);
  std::replace(name.begin(), name.end(), '-', '_');
  return name;
}

class ShardedGolden : public ::testing::TestWithParam<GoldenCase> {
 protected:
  void SetUp() override {
    dir_ = testing::golden_root() + GetParam().model;
    golden_ = testing::read_golden(dir_);
    group_ = load_group(dir_, GetParam().ranks, GetParam().moe);
  }
  std::string dir_;
  testing::Golden golden_;
  Group group_;
};

// The whole prompt at once, and a prefill followed by one-token decode steps, match the float64
// reference as closely as one rank does; greedy continuation is the reference's.
TEST_P(ShardedGolden, MatchesTheReference) {
  Model& model = *group_.model;
  const int64_t n = int64_t(golden_.tokens.size());
  const double whole = relative_error(testing::run_chunked(model, golden_.tokens, {n}), golden_.logits);
  const double decoded = relative_error(testing::run_chunked(model, golden_.tokens, {n - 40, 1}), golden_.logits);
  std::printf("%s over %d ranks (%s MoE): relative error %.3g whole, %.3g prefill + decode\n", GetParam().model.c_str(),
              GetParam().ranks, moe_parallel_name(GetParam().moe).c_str(), whole, decoded);
  EXPECT_LE(whole, kExactBound);
  EXPECT_LE(decoded, kExactBound);
  EXPECT_EQ(greedy(model, golden_.tokens, golden_.greedy.size()), golden_.greedy);
}

INSTANTIATE_TEST_SUITE_P(Ranks, ShardedGolden,
                         ::testing::Values(GoldenCase{"tiny-bf16", 2, MoeParallel::kTensor},
                                           GoldenCase{"tiny-bf16", 4, MoeParallel::kTensor},
                                           GoldenCase{"tiny-bf16", 4, MoeParallel::kExpert},
                                           GoldenCase{"odd-f32", 2, MoeParallel::kExpert},
                                           GoldenCase{"odd-f32", 3, MoeParallel::kTensor},
                                           GoldenCase{"odd-f32", 6, MoeParallel::kTensor}),
                         case_name);

// Batch invariance holds at N > 1: two sequences sharing steps get the logits they get alone,
// and a fork continues exactly like its original.
TEST(TensorParallel, BatchingChangesNoLogit) {
  for (auto [model, ranks] : {std::pair{"tiny-bf16", 2}, std::pair{"odd-f32", 3}}) {
    SCOPED_TRACE(std::string(model) + " over " + std::to_string(ranks));
    const std::string dir = testing::golden_root() + model;
    const testing::Golden golden = testing::read_golden(dir);
    Group g = load_group(dir, ranks);
    testing::expect_batched_matches_solo(*g.model, golden.tokens);
    testing::expect_clone_continues_identically(*g.model, golden.tokens);
  }
}

// Shapes the goldens lack: 6 heads over 2 and 3 ranks (KV heads split and shared), 6 heads with
// 3 KV heads over 2 (KV heads copied per query head), 64 heads over 8 ranks; both MoE splits where
// the experts divide. Logits stay within the exact bound of one rank's; greedy output is the same.
TEST(TensorParallel, GreedyOutputIsTheSameAtEveryN) {
  struct Case {
    ModelConfig config;
    std::vector<int> ranks;
  };
  const std::vector<Case> cases = {{shaped(6, 2, 8, 6), {2, 3}}, {shaped(6, 3, 8, 6), {2}}, {shaped(64, 8, 4, 8), {8}}};
  const std::vector<int32_t> prompt{3, 141, 59, 26, 535, 89, 79, 323, 84, 626, 43, 38, 327, 95, 2, 88};
  for (const Case& c : cases) {
    Group one = random_group(c.config, 1);
    const std::vector<float> want = testing::run_chunked(*one.model, prompt, {int64_t(prompt.size())});
    const std::vector<int32_t> tokens = greedy(*one.model, prompt, 12);
    for (int ranks : c.ranks)
      for (MoeParallel moe : {MoeParallel::kTensor, MoeParallel::kExpert}) {
        if (moe == MoeParallel::kExpert && c.config.num_local_experts % ranks != 0) continue;
        SCOPED_TRACE(fmt::format("{} heads, {} KV heads, {} ranks, {} MoE", c.config.num_attention_heads,
                                 c.config.num_key_value_heads, ranks, moe_parallel_name(moe)));
        Group g = random_group(c.config, ranks, moe);
        EXPECT_LE(relative_error(testing::run_chunked(*g.model, prompt, {5, 1}), want), kExactBound);
        EXPECT_EQ(greedy(*g.model, prompt, 12), tokens);
      }
  }
}

// Memory per rank: each holds its share of the split weights plus the replicated ones (norms,
// routers), together far less than the whole for many ranks.
TEST(TensorParallel, EachRankHoldsItsShare) {
  const ModelConfig c = shaped(64, 8, 4, 8);
  Group one = random_group(c, 1), eight = random_group(c, 8, MoeParallel::kExpert);
  const size_t whole = one.model->rank_weight_bytes()[0];
  size_t sum = 0;
  for (size_t bytes : eight.model->rank_weight_bytes()) {
    EXPECT_LT(bytes, whole / 4);
    sum += bytes;
  }
  EXPECT_GE(sum, whole);  // the replicated parts count once per rank
  EXPECT_LT(sum, whole * 11 / 10);
}

// A rank that throws inside a step fails the step on every rank instead of leaving them waiting in
// a collective; the group then refuses further steps with the cause.
TEST(TensorParallel, FailingRankStopsTheStep) {
  class FailingMoe : public ForwardingBackend {
   public:
    using ForwardingBackend::ForwardingBackend;
    void moe(const Mat& x, const MoeWeights& w, Mat out) override {
      if (++calls_ == 3) throw Error("injected expert failure");
      inner_->moe(x, w, out);
    }

   private:
    int calls_ = 0;
  };
  std::vector<std::unique_ptr<Backend>> backends = create_backends(cpu_ranks(3));
  backends[1] = std::make_unique<FailingMoe>(std::move(backends[1]));
  const std::string dir = testing::golden_root() + "odd-f32";
  auto model = Model::load(dir, rank_pointers(backends));
  auto seq = model->new_sequence();
  StepLogits out;
  const std::vector<int32_t> tokens{5, 6, 7};
  BatchEntry e{seq.get(), tokens, LogitsFor::kLast};
  testing::expect_error([&] { model->forward({&e, 1}, out); }, {"injected expert failure"});
  testing::expect_error([&] { model->forward({&e, 1}, out); }, {"rank 1 failed", "injected expert failure"});
}

TEST(TensorParallel, StatesServeOnlyTheirModel) {
  const std::string dir = testing::golden_root() + "tiny-bf16";
  Group two = load_group(dir, 2), other = load_group(dir, 2);
  auto backend = create_backend(cpu_ranks(1));
  auto one = Model::load(dir, *backend);
  StepLogits out;
  const std::vector<int32_t> tokens{1, 2};
  auto expect_refused = [&](Model& model, const Model& maker) {
    auto state = maker.new_sequence();
    BatchEntry e{state.get(), tokens, LogitsFor::kLast};
    testing::expect_error([&] { model.forward({&e, 1}, out); }, {"made for another model"});
  };
  expect_refused(*two.model, *one);
  expect_refused(*one, *two.model);
  expect_refused(*two.model, *other.model);
}

// --- With quantized weights and the prefix cache --------------------------------------------

Group quantized_group(const ModelConfig& config, int ranks, const QuantScheme& scheme) {
  Group g;
  g.backends = create_backends(cpu_ranks(ranks));
  g.model = std::make_unique<Model>(config, random_checkpoint(config, DType::kBF16, 5), rank_pointers(g.backends),
                                    quantized_load(scheme));
  return g;
}

// Quantized at load, each rank quantizes its own slice, and the splits of the row-parallel
// products' inputs fall on the int4 groups: N ranks hold exactly the codes and scales of one, so
// the logits differ from one rank's only in the order of the sums, and greedy output is the same.
TEST(TensorParallel, QuantizedAtLoadGivesOneRanksOutput) {
  ModelConfig c = shaped(6, 2, 32, 6);  // out_proj: 192 inputs, 96 or 64 a rank (groups of 32)
  c.intermediate_size = 160;            // over 2 ranks 96 + 64, over 3 64 + 64 + 32: on groups
  c = parse_config(config_to_json(c), "test config");
  const std::vector<int32_t> prompt{3, 141, 59, 26, 535, 89, 79, 323, 84, 626, 43};
  for (const QuantScheme scheme : {QuantScheme{DType::kQ8, 0}, QuantScheme{DType::kQ4, 32}}) {
    Group one = quantized_group(c, 1, scheme);
    const std::vector<float> want = testing::run_chunked(*one.model, prompt, {int64_t(prompt.size())});
    const std::vector<int32_t> tokens = greedy(*one.model, prompt, 8);
    for (int ranks : {2, 3}) {
      SCOPED_TRACE(fmt::format("{} over {} ranks", dtype_name(scheme.type), ranks));
      Group g = quantized_group(c, ranks, scheme);
      const std::vector<size_t> bytes = g.model->rank_weight_bytes();
      EXPECT_LT(bytes[1], one.model->rank_weight_bytes()[0] * 7 / 10);  // quantized bytes, a share of them
      EXPECT_LE(relative_error(testing::run_chunked(*g.model, prompt, {5, 1}), want), kExactBound);
      EXPECT_EQ(greedy(*g.model, prompt, 8), tokens);
    }
  }
  // Too few inputs for whole groups: the split cannot fall on one, and the load says so.
  ModelConfig narrow = shaped(6, 2, 8, 6);  // out_proj: 48 inputs, 24 a rank
  testing::expect_error([&] { quantized_group(narrow, 2, QuantScheme{DType::kQ4, 32}); },
                        {"48 inputs", "column 24", "group of 32"});
}

// A compressed-tensors checkpoint (m1-quantize's) is sliced in place, packed codes and scale rows:
// two ranks give one rank's greedy output and logits.
TEST(TensorParallel, CompressedTensorsCheckpointOverRanks) {
  namespace fs = std::filesystem;
  const fs::path out = fs::temp_directory_path() / ("m1-tp-int4-" + std::to_string(::getpid()));
  fs::remove_all(out);
  const std::string golden = testing::golden_root() + "tiny-bf16";
  const auto made = testing::run_command(std::string(M1_BIN_DIR) + "/m1-quantize --model " + golden + " --out " +
                                         out.string() + " --quantize int4");
  ASSERT_EQ(made.status, 0) << made.err;
  const std::vector<int32_t> prompt{1, 20, 300, 45, 6, 78};
  Group one = load_group(out.string(), 1), two = load_group(out.string(), 2);
  EXPECT_LE(relative_error(testing::run_chunked(*two.model, prompt, {4, 2}),
                           testing::run_chunked(*one.model, prompt, {int64_t(prompt.size())})),
            kExactBound);
  EXPECT_EQ(greedy(*two.model, prompt, 8), greedy(*one.model, prompt, 8));
  fs::remove_all(out);
}

// A sharded sequence's state in its portable form: each rank's heads and KV heads put together,
// restored into a new state that goes on as the original; snapshots record the group.
TEST(TensorParallel, StatesSnapshotAndRestoreAcrossRanks) {
  for (auto [config, ranks] : {std::pair{shaped(6, 2, 8, 6), 3}, std::pair{shaped(6, 3, 8, 6), 2}}) {
    SCOPED_TRACE(fmt::format("{} KV heads over {} ranks", config.num_key_value_heads, ranks));
    Group g = random_group(config, ranks);
    Group one = random_group(config, 1);
    const std::vector<int32_t> prompt{3, 141, 59, 26, 535, 89, 79, 323};
    auto seq = g.model->new_sequence();
    StepLogits out;
    BatchEntry e{seq.get(), prompt, LogitsFor::kLast};
    g.model->forward({&e, 1}, out);
    const StateCopy copy = copy_state(*seq);
    // The portable form is the whole model's: one rank's state of the same prompt has its layout.
    auto whole = one.model->new_sequence();
    BatchEntry w{whole.get(), prompt, LogitsFor::kLast};
    one.model->forward({&w, 1}, out);
    const StateCopy one_copy = copy_state(*whole);
    ASSERT_EQ(copy.kv.size(), one_copy.kv.size());
    ASSERT_EQ(copy.lightning.size(), one_copy.lightning.size());
    auto floats_of = [](const std::vector<std::byte>& b) {
      const auto* p = reinterpret_cast<const float*>(b.data());
      return std::vector<float>(p, p + b.size() / sizeof(float));
    };
    EXPECT_LE(relative_error(floats_of(copy.lightning), floats_of(one_copy.lightning)), kExactBound);

    auto restored = restore_state(*g.model, copy.pieces());
    EXPECT_EQ(copy_state(*restored).kv, copy.kv);
    EXPECT_EQ(copy_state(*restored).lightning, copy.lightning);
    std::vector<int32_t> a, b;
    for (auto* state : {seq.get(), restored.get()}) {
      std::vector<int32_t>& got = state == seq.get() ? a : b;
      int32_t next = 7;
      for (int i = 0; i < 4; ++i) {
        BatchEntry step{state, {&next, 1}, LogitsFor::kLast};
        g.model->forward({&step, 1}, out);
        auto row = out.row(0, 0);
        next = int32_t(std::max_element(row.begin(), row.end()) - row.begin());
        got.push_back(next);
      }
    }
    EXPECT_EQ(a, b);
    EXPECT_NE(snapshot_format(*g.model).numerics, snapshot_format(*one.model).numerics);
  }
}

}  // namespace
}  // namespace m1
