// Tensor parallelism on the CUDA backend: the peer collectives (our one-shot kernels, which serve
// several ranks on one GPU) sum in rank order, bit for bit, from graphs too; the golden models
// split over 2 and 4 ranks sharing one GPU match their references and one rank's greedy choices;
// decode steps replayed as graphs on every rank give the eager bits; and the GPU list is checked.
// NCCL runs where a GPU and libnccl are (it cannot share a GPU, nor run on the emulator).

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "collectives.h"
#include "communicator.h"
#include "cuda_check.h"
#include "cuda_test_support.h"
#include "device.h"
#include "golden_support.h"
#include "m1/error.h"
#include "m1/model.h"
#include "m1/synthetic.h"
#include "test_support.h"

namespace m1 {
namespace {

using testing::relative_error;

// The CUDA golden bound (the KV cache is bf16): see test_cuda_backend.
constexpr double kExactBound = 2e-3;
// Positions of the golden prompts fed here: enough for every layer kind, cheap on the emulator.
constexpr size_t kPrompt = 40;

int gpu_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

// fn(rank) on `world` threads at once, each with GPU `gpus[rank]` current.
void on_ranks(const std::vector<int>& gpus, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < int(gpus.size()); ++r)
    threads.emplace_back([&, r] {
      M1_CUDA_CHECK(cudaSetDevice(gpus[size_t(r)]));
      fn(r);
    });
  for (auto& t : threads) t.join();
}

// Each rank's random data, and their sums in rank order.
struct ReduceCase {
  std::vector<std::vector<float>> data;
  std::vector<float> sum;
  ReduceCase(int world, int64_t count) {
    for (int r = 0; r < world; ++r) data.push_back(testing::random_floats(size_t(count), 100.0f));
    sum = data[0];
    for (int r = 1; r < world; ++r)
      for (int64_t i = 0; i < count; ++i) sum[size_t(i)] += data[size_t(r)][size_t(i)];
  }
};

// Every rank all-reduces its data `calls` times in a row (each call on fresh copies of it), then
// checks each result against the rank-order sum, bit for bit. With `graph`, the calls are
// captured once and the graph replayed.
void expect_rank_order_sums(const std::vector<int>& gpus, int64_t count, int64_t capacity, bool graph) {
  const int world = int(gpus.size());
  std::vector<std::unique_ptr<cuda::Communicator>> comms = cuda::make_peer_communicators(gpus, capacity);
  const ReduceCase c(world, count);
  constexpr int kCalls = 3;
  on_ranks(gpus, [&](int r) {
    cudaStream_t stream;
    M1_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    std::vector<test::DeviceArray<float>> buffers;
    for (int call = 0; call < kCalls; ++call) buffers.emplace_back(size_t(std::max<int64_t>(count, 1)));
    auto upload = [&] {
      for (auto& b : buffers)
        M1_CUDA_CHECK(cudaMemcpy(b.get(), c.data[size_t(r)].data(), size_t(count) * sizeof(float), cudaMemcpyHostToDevice));
    };
    auto reduce = [&] {
      for (auto& b : buffers) comms[size_t(r)]->all_reduce_sum(b.get(), count, stream);
    };
    upload();
    if (graph) {
      cudaGraph_t captured = nullptr;
      cudaGraphExec_t exec = nullptr;
      M1_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
      reduce();
      M1_CUDA_CHECK(cudaStreamEndCapture(stream, &captured));
      M1_CUDA_CHECK(cudaGraphInstantiate(&exec, captured, 0));
      for (int replay = 0; replay < 2; ++replay) {  // the device-side call counts go on from replay to replay
        upload();
        M1_CUDA_CHECK(cudaGraphLaunch(exec, stream));
        M1_CUDA_CHECK(cudaStreamSynchronize(stream));
      }
      M1_CUDA_CHECK(cudaGraphExecDestroy(exec));
      M1_CUDA_CHECK(cudaGraphDestroy(captured));
    } else {
      reduce();
      M1_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    for (auto& b : buffers) {
      std::vector<float> got(static_cast<size_t>(count));
      M1_CUDA_CHECK(cudaMemcpy(got.data(), b.get(), got.size() * sizeof(float), cudaMemcpyDeviceToHost));
      EXPECT_EQ(std::memcmp(got.data(), c.sum.data(), got.size() * sizeof(float)), 0)
          << "rank " << r << " of " << world << ", " << count << " floats";
    }
    M1_CUDA_CHECK(cudaStreamDestroy(stream));
  });
}

TEST(CudaPeerCollectives, SumInRankOrderOnOneGpu) {
  M1_REQUIRE_CUDA();
  for (int world : {2, 4}) {
    const std::vector<int> gpus(size_t(world), 0);
    expect_rank_order_sums(gpus, 1, 1 << 12, false);
    expect_rank_order_sums(gpus, 6151, 1 << 13, false);
    expect_rank_order_sums(gpus, 5003, 1000, false);  // split into six calls
    expect_rank_order_sums(gpus, 777, 1 << 12, true);
  }
}

TEST(CudaPeerCollectives, GatherColumnsOnRankZero) {
  M1_REQUIRE_CUDA();
  const std::vector<int> gpus{0, 0, 0};
  const std::vector<int64_t> widths{5, 3, 4};
  const int64_t rows = 7, total = 12;
  auto comms = cuda::make_peer_communicators(gpus, 16);  // rows of the widest part: 3 at a time
  std::vector<std::vector<float>> parts(3);
  for (int r = 0; r < 3; ++r) parts[size_t(r)] = testing::random_floats(size_t(rows * widths[size_t(r)]));
  std::vector<float> got(size_t(rows * total));
  on_ranks(gpus, [&](int r) {
    cudaStream_t stream;
    M1_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    test::DeviceArray<float> part(parts[size_t(r)].size()), out(got.size());
    M1_CUDA_CHECK(cudaMemcpy(part.get(), parts[size_t(r)].data(), parts[size_t(r)].size() * sizeof(float),
                             cudaMemcpyHostToDevice));
    comms[size_t(r)]->gather_columns(part.get(), rows, widths, r == 0 ? out.get() : nullptr, stream);
    M1_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (r == 0) M1_CUDA_CHECK(cudaMemcpy(got.data(), out.get(), got.size() * sizeof(float), cudaMemcpyDeviceToHost));
    M1_CUDA_CHECK(cudaStreamDestroy(stream));
  });
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t c = 0, r = 0, first = 0; c < total; ++c) {
      while (c >= first + widths[size_t(r)]) first += widths[size_t(r++)];
      EXPECT_EQ(got[size_t(row * total + c)], parts[size_t(r)][size_t(row * widths[size_t(r)] + c - first)])
          << "row " << row << " column " << c;
    }
}

// The kernels the NCCL path runs after NCCL moved the data: the rank-order sum of gathered rows,
// and the placing of gathered parts as columns.
TEST(CudaCollectiveKernels, SumAndPlaceColumns) {
  M1_REQUIRE_CUDA();
  const int world = 3;
  const ReduceCase c(world, 1001);
  std::vector<float> gathered;
  for (const auto& d : c.data) gathered.insert(gathered.end(), d.begin(), d.end());
  test::DeviceArray<float> dgathered(gathered), sum(c.sum.size());
  cuda::sum_in_rank_order(dgathered.get(), world, int64_t(c.sum.size()), sum.get(), nullptr);
  const std::vector<float> got = sum.download();
  EXPECT_EQ(std::memcmp(got.data(), c.sum.data(), got.size() * sizeof(float)), 0);

  cuda::ColumnSplit split;
  const int64_t widths[] = {4, 1, 6}, rows = 5;
  for (int r = 0; r < world; ++r) split.widths[r] = widths[r], split.offsets[r] = split.total, split.total += widths[r];
  const std::vector<float> parts = testing::random_floats(size_t(rows * split.total));  // part r after part r - 1
  test::DeviceArray<float> dparts(parts), out(size_t(rows * split.total));
  cuda::place_columns(dparts.get(), world, rows, split, out.get(), nullptr);
  const std::vector<float> placed = out.download();
  for (int r = 0; r < world; ++r)
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t c2 = 0; c2 < widths[r]; ++c2)
        EXPECT_EQ(placed[size_t(row * split.total + split.offsets[r] + c2)],
                  parts[size_t(rows * split.offsets[r] + row * widths[r] + c2)])
            << "rank " << r << " row " << row << " column " << c2;
}

// A model over the ranks that `options` make, with its backends.
struct CudaGroup {
  std::vector<std::unique_ptr<Backend>> backends;
  std::unique_ptr<Model> model;  // after backends: destroyed first

  CudaGroup(const std::string& dir, int ranks, std::vector<int> gpus, std::string collectives, bool graphs = true,
            MoeParallel moe = MoeParallel::kTensor) {
    backends = create_backends(options(ranks, std::move(gpus), std::move(collectives), graphs));
    LoadOptions load;
    load.shard = ShardOptions{moe};
    model = Model::load(dir, rank_pointers(backends), load);
  }
  // Random weights of `config` instead of a checkpoint.
  CudaGroup(const ModelConfig& config, int ranks, std::vector<int> gpus) {
    backends = create_backends(options(ranks, std::move(gpus), "auto", true));
    model = std::make_unique<Model>(config, random_checkpoint(config, DType::kBF16, 3), rank_pointers(backends));
  }
  static BackendOptions options(int ranks, std::vector<int> gpus, std::string collectives, bool graphs) {
    BackendOptions o{"cuda", 0, Precision::kExact, false, graphs};
    o.tensor_parallel = ranks;
    o.gpus = std::move(gpus);
    o.collectives = std::move(collectives);
    return o;
  }
};

std::vector<float> golden_prefix(const testing::Golden& g, int64_t vocab) {
  return {g.logits.begin(), g.logits.begin() + int64_t(kPrompt) * vocab};
}

std::vector<int32_t> argmax_rows(const std::vector<float>& logits, int64_t vocab) {
  std::vector<int32_t> best;
  for (size_t at = 0; at < logits.size(); at += size_t(vocab))
    best.push_back(int32_t(std::max_element(logits.begin() + int64_t(at), logits.begin() + int64_t(at) + vocab) -
                           (logits.begin() + int64_t(at))));
  return best;
}

class CudaShardedGolden : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    M1_REQUIRE_CUDA();
    dir_ = testing::golden_root() + GetParam();
    golden_ = testing::read_golden(dir_);
    prompt_.assign(golden_.tokens.begin(), golden_.tokens.begin() + kPrompt);
  }
  std::string dir_;
  testing::Golden golden_;
  std::vector<int32_t> prompt_;
};

// Ranks sharing GPU 0 through the peer kernels: prefill then decode steps (recorded and replayed
// as graphs) match the golden logits, and pick the tokens one rank picks; the graph steps give the
// eager steps' bits.
TEST_P(CudaShardedGolden, RanksSharingOneGpuMatchTheReference) {
  const int64_t vocab = int64_t(golden_.logits.size() / golden_.tokens.size());
  const std::vector<float> want = golden_prefix(golden_, vocab);
  CudaGroup one(dir_, 1, {}, "auto");
  const std::vector<float> alone = testing::run_chunked(*one.model, prompt_, {int64_t(kPrompt) - 8, 1});
  for (int ranks : {2, 4}) {
    SCOPED_TRACE(std::to_string(ranks) + " ranks on GPU 0");
    CudaGroup graphs(dir_, ranks, std::vector<int>(size_t(ranks), 0), "auto");
    EXPECT_NE(graphs.backends[1]->name().find("peer collectives"), std::string::npos) << graphs.backends[1]->name();
    const std::vector<float> got = testing::run_chunked(*graphs.model, prompt_, {int64_t(kPrompt) - 8, 1});
    const double err = relative_error(got, want);
    std::printf("%s over %d ranks on one GPU: relative error %.3g\n", GetParam().c_str(), ranks, err);
    EXPECT_LE(err, kExactBound);
    EXPECT_EQ(argmax_rows(got, vocab), argmax_rows(alone, vocab));
    CudaGroup eager(dir_, ranks, std::vector<int>(size_t(ranks), 0), "peer", /*graphs=*/false);
    EXPECT_EQ(testing::run_chunked(*eager.model, prompt_, {int64_t(kPrompt) - 8, 1}), got);
  }
}

// Batch invariance at N > 1 on the GPU: two sequences sharing steps get what they get alone.
TEST_P(CudaShardedGolden, BatchingChangesNoLogitOverRanks) {
  CudaGroup two(dir_, 2, {0, 0}, "peer", true, MoeParallel::kExpert);
  testing::expect_batched_matches_solo(*two.model, golden_.tokens);
}

INSTANTIATE_TEST_SUITE_P(Models, CudaShardedGolden, ::testing::Values("tiny-bf16"));

// Eight ranks on one GPU (a random model of 8 heads, each rank one head and one KV-head copy):
// the logits of one rank's, within the CUDA exact bound, and its greedy choices.
TEST(CudaTensorParallel, EightRanksOnOneGpu) {
  M1_REQUIRE_CUDA();
  ModelConfig c = preset("tiny").config;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.rotary_dim = 4;
  c.num_hidden_layers = 2;
  c.attn_type_list = {0, 1};
  c.vocab_size = 300;
  c = parse_config(config_to_json(c), "test config");
  const std::vector<int32_t> prompt{5, 99, 3, 250, 17, 8, 42, 7};
  CudaGroup one(c, 1, {}), eight(c, 8, std::vector<int>(8, 0));
  const std::vector<float> want = testing::run_chunked(*one.model, prompt, {5, 1});
  const std::vector<float> got = testing::run_chunked(*eight.model, prompt, {5, 1});
  EXPECT_LE(relative_error(got, want), kExactBound);
  EXPECT_EQ(argmax_rows(got, c.vocab_size), argmax_rows(want, c.vocab_size));
}

// Ranks on GPUs of their own through NCCL: one rank (the measurement of NCCL's cost against
// today's path runs in scripts/gpu-check.sh) and, where the machine has them, two.
TEST(CudaNccl, GoldenThroughNccl) {
  M1_REQUIRE_CUDA();
  const std::string dir = testing::golden_root() + "tiny-bf16";
  const testing::Golden golden = testing::read_golden(dir);
  const int64_t vocab = int64_t(golden.logits.size() / golden.tokens.size());
  const std::vector<int32_t> prompt(golden.tokens.begin(), golden.tokens.begin() + kPrompt);
  for (int ranks : {1, 2}) {
    if (ranks > gpu_count()) {
      std::printf("NCCL over %d ranks: skipped, this machine has %d GPU(s)\n", ranks, gpu_count());
      continue;
    }
    std::unique_ptr<CudaGroup> group;
    try {
      group = std::make_unique<CudaGroup>(dir, ranks, std::vector<int>{}, "nccl");
    } catch (const Error& e) {
      GTEST_SKIP() << "NCCL is not usable here: " << e.what();
    }
    const double err = relative_error(testing::run_chunked(*group->model, prompt, {int64_t(kPrompt) - 4, 1}),
                                      golden_prefix(golden, vocab));
    std::printf("tiny-bf16 through NCCL over %d rank(s): relative error %.3g\n", ranks, err);
    EXPECT_LE(err, kExactBound);
  }
}

// Two emulated GPUs (EMU_DEVICES; on a real machine, two real ones): the backend opts each GPU's
// kernels into their shared memory on that GPU, and the peer kernels reach across.
TEST(CudaTensorParallel, RanksOnTwoGpus) {
  M1_REQUIRE_CUDA();
  if (gpu_count() < 2) GTEST_SKIP() << "this machine has " << gpu_count() << " GPU(s) (the emulator: EMU_DEVICES=2)";
  const std::string dir = testing::golden_root() + "tiny-bf16";
  const testing::Golden golden = testing::read_golden(dir);
  const int64_t vocab = int64_t(golden.logits.size() / golden.tokens.size());
  const std::vector<int32_t> prompt(golden.tokens.begin(), golden.tokens.begin() + kPrompt);
  CudaGroup two(dir, 2, {0, 1}, "peer");
  EXPECT_LE(relative_error(testing::run_chunked(*two.model, prompt, {int64_t(kPrompt)}), golden_prefix(golden, vocab)),
            kExactBound);
}

TEST(CudaTensorParallel, GpuListsAreChecked) {
  M1_REQUIRE_CUDA();
  const int count = gpu_count();
  auto options = [](int ranks, std::vector<int> gpus, std::string collectives = "auto") {
    BackendOptions o{"cuda", 0, Precision::kExact, false};
    o.tensor_parallel = ranks;
    o.gpus = std::move(gpus);
    o.collectives = std::move(collectives);
    return o;
  };
  testing::expect_error([&] { create_backends(options(1, {count})); },
                        {"--gpus: GPU " + std::to_string(count) + " does not exist", std::to_string(count) + " GPU"});
  testing::expect_error([&] { create_backends(options(count + 1, {})); },
                        {"--tensor-parallel " + std::to_string(count + 1), "needs " + std::to_string(count + 1) + " GPUs",
                         "has " + std::to_string(count)});
  testing::expect_error([&] { create_backends(options(2, {0})); }, {"--gpus lists 1 GPUs for --tensor-parallel 2"});
  testing::expect_error([&] { create_backends(options(2, {0, 0}, "nccl")); }, {"GPU 0 is listed for ranks 0 and 1"});
  testing::expect_error([&] { create_backends(options(2, {0, 0}, "ring")); }, {"--collectives 'ring'"});
}

}  // namespace
}  // namespace m1
