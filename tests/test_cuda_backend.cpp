// The whole model on the CUDA backend: the golden models' float64 logits however the prompt is
// fed, batch invariance and forks bit for bit, and agreement with the CPU backend on a random
// model through a mix of prefill and decode steps; decode steps replayed as CUDA graphs bit for bit
// as eager ones. Without a GPU, asking for the CUDA backend is a clear error.

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_backend.h"
#include "cuda_check.h"
#include "cuda_test_support.h"
#include "golden_support.h"
#include "m1/error.h"
#include "m1/model.h"
#include "m1/prefill.h"
#include "m1/state_snapshot.h"
#include "m1/synthetic.h"
#include "memory_epoch.h"
#include "sampling_checks.h"
#include "step_graphs.h"
#include "test_support.h"

namespace m1 {
namespace {

// Exact precision multiplies in fp32 like the CPU backend, but the KV cache holds bf16 (8
// significant bits, relative rounding up to 2^-9 = 2e-3 per value, far less on average once
// attention averages many of them), which the CPU's fp32 cache does not: 2e-3 where the CPU
// holds 1e-4.
constexpr double kExactBound = 2e-3;
// Fast precision also rounds the projection and expert activations to bf16: the CPU's bound.
constexpr double kFastBound = 3e-2;

using testing::relative_error;

TEST(CudaBackendAvailability, WithoutADeviceAskingForItIsAClearError) {
  if (test::cuda_unavailable_reason().empty()) GTEST_SKIP() << "a CUDA device is present";
  try {
    create_backend(BackendOptions{"cuda", 0, Precision::kFast, false});
    FAIL() << "create_backend made a CUDA backend without a device";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cuda"), std::string::npos) << e.what();
  }
}

// M1_WGMMA chooses which warpgroup kernels run (0, 1, products, attention): anything else is
// refused when the device is opened, naming the variable, instead of silently running without them.
TEST(CudaBackendAvailability, UnknownWarpgroupChoiceIsAClearError) {
  M1_REQUIRE_CUDA();
  // The test device is made (and reads M1_WGMMA) before the variable changes; the variable is put
  // back however the test ends.
  const int index = test::test_device().index();
  struct Restore {
    std::optional<std::string> value;
    ~Restore() {
      if (value)
        setenv("M1_WGMMA", value->c_str(), 1);
      else
        unsetenv("M1_WGMMA");
    }
  } restore{std::getenv("M1_WGMMA") ? std::optional<std::string>(std::getenv("M1_WGMMA")) : std::nullopt};

  setenv("M1_WGMMA", "yes", 1);
  try {
    cuda::Device device(index);
    ADD_FAILURE() << "M1_WGMMA=yes was accepted";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "M1_WGMMA: expected 0, 1, products or attention, not 'yes'");
  }
  // The choices that are known each turn on their family, where the GPU and build have them.
  const bool available = cuda::warpgroup_mma_available(index);
  for (const std::string choice : {"0", "1", "products", "attention"}) {
    setenv("M1_WGMMA", choice.c_str(), 1);
    const cuda::Device device(index);
    EXPECT_EQ(device.limits().warpgroup_mma, available && (choice == "1" || choice == "products")) << choice;
    EXPECT_EQ(device.limits().warpgroup_attention, available && (choice == "1" || choice == "attention")) << choice;
  }
}

TEST(CudaBackendAvailability, ReferenceKernelsAreRefused) {
  try {
    create_backend(BackendOptions{"cuda", 0, Precision::kExact, true});
    FAIL() << "the CUDA backend accepted reference kernels";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("reference kernels run on the CPU only"), std::string::npos) << e.what();
  }
}

// Snapshot files record a backend's numerics: the CUDA backend's names the precision and the
// kernels' arithmetic revision (raised when the bf16 lightning prefill's bits moved), so a file
// from before is skipped, not resumed with other bits.
TEST(CudaBackendNumerics, NameThePrecisionAndTheArithmeticRevision) {
  M1_REQUIRE_CUDA();
  for (Precision precision : {Precision::kFast, Precision::kExact}) {
    auto backend = create_backend(BackendOptions{"cuda", 0, precision, false});
    const std::string numerics = backend->numerics();
    EXPECT_NE(numerics.find(precision == Precision::kFast ? "fast precision" : "exact precision"), std::string::npos)
        << numerics;
    EXPECT_NE(numerics.find("arithmetic 3"), std::string::npos) << numerics;
  }
}

// Sampling on the device against the host reference, at the real model's vocabulary too.
TEST(CudaBackendSampling, MatchesSampleRow) {
  M1_REQUIRE_CUDA();
  auto backend = create_backend(BackendOptions{"cuda", 0, Precision::kFast, false});
  for (int64_t vocab : {1, 7, 1000, 200064}) {
    const SamplingCase c = sampling_case(vocab, 29 + uint64_t(vocab));
    Buffer logits(*backend, c.rows, c.vocab);
    M1_CUDA_CHECK(cudaDeviceSynchronize());  // the allocation is ordered on the backend's stream
    M1_CUDA_CHECK(cudaMemcpy(logits.mat().data, c.logits.data(), c.logits.size() * sizeof(float), cudaMemcpyHostToDevice));
    SCOPED_TRACE(vocab);
    expect_matches_sample_row(*backend, logits.mat(), c);
  }
}

class CudaGolden : public testing::GoldenModelTest {
 protected:
  void SetUp() override {
    M1_REQUIRE_CUDA();
    GoldenModelTest::SetUp();
  }
  void load(Precision precision) {
    model_.reset();
    backend_ = create_backend(BackendOptions{"cuda", 0, precision, false});
    model_ = Model::load(dir_, *backend_);
    ASSERT_EQ(golden_.logits.size(), golden_.tokens.size() * size_t(model_->config().vocab_size));
  }
};

TEST_P(CudaGolden, ExactWholePromptAndChunks) {
  load(Precision::kExact);
  EXPECT_NE(backend_->name().find("cuda"), std::string::npos) << backend_->name();
  const std::vector<float> whole = run_chunked({int64_t(golden_.tokens.size())});
  const double err = relative_error(whole, golden_.logits);
  std::printf("%s cuda exact, whole prompt: relative error %.3g\n", GetParam().c_str(), err);
  EXPECT_LE(err, kExactBound);
  for (int64_t chunk : {1, 7, 64}) {
    const std::vector<float> chunked = run_chunked({chunk});
    const double to_golden = relative_error(chunked, golden_.logits), to_whole = relative_error(chunked, whole);
    std::printf("%s cuda exact, chunks of %ld: relative error %.3g (%.3g from the whole prompt)\n", GetParam().c_str(),
                long(chunk), to_golden, to_whole);
    EXPECT_LE(to_golden, kExactBound) << "chunk " << chunk;
    // Both read the same bf16 cache; only summation order in attention and the two forms of
    // lightning attention differ, yet the kernels may keep a step's own keys in fp32: the same bound.
    EXPECT_LE(to_whole, kExactBound) << "chunk " << chunk;
  }
}

TEST_P(CudaGolden, ExactPrefillThenDecode) {
  load(Precision::kExact);
  const int64_t n = int64_t(golden_.tokens.size());
  const double err = relative_error(run_chunked({n - 40, 1}), golden_.logits);
  std::printf("%s cuda exact, prefill %ld + 40 decode steps: relative error %.3g\n", GetParam().c_str(), long(n - 40), err);
  EXPECT_LE(err, kExactBound);
}

TEST_P(CudaGolden, FastWithinBound) {
  load(Precision::kFast);
  const double whole = relative_error(run_chunked({int64_t(golden_.tokens.size())}), golden_.logits);
  const double chunked = relative_error(run_chunked({7}), golden_.logits);
  std::printf("%s cuda fast: relative error %.3g whole, %.3g in chunks of 7\n", GetParam().c_str(), whole, chunked);
  EXPECT_LE(whole, kFastBound);
  EXPECT_LE(chunked, kFastBound);
}

// A checkpoint stored in F32 (odd-f32) rounds nothing in fast precision: its products, its softmax
// attention and its lightning attention take their exact forms, so fast gives exact's bits, whole
// and in chunks (the KV cache is bf16 in both).
TEST_P(CudaGolden, FastOnF32WeightsGivesExactBits) {
  load(Precision::kExact);
  if (model_->checkpoint().tensors().begin()->second.dtype_name != "F32") GTEST_SKIP() << "bf16 weights round in fast";
  const int64_t n = int64_t(golden_.tokens.size());
  const std::vector<float> whole = run_chunked({n}), chunked = run_chunked({7});
  load(Precision::kFast);
  EXPECT_EQ(run_chunked({n}), whole);
  EXPECT_EQ(run_chunked({7}), chunked);
}

// Two sequences of different lengths in one step, then decoding together: each gets exactly the
// logits it gets alone, in both precisions.
TEST_P(CudaGolden, BatchedSequencesMatchSolo) {
  for (Precision precision : {Precision::kExact, Precision::kFast}) {
    load(precision);
    SCOPED_TRACE(precision == Precision::kExact ? "exact" : "fast");
    testing::expect_batched_matches_solo(*model_, golden_.tokens);
  }
}

// A forked sequence continues exactly like the original, and reports the same size.
TEST_P(CudaGolden, CloneContinuesIdentically) {
  load(Precision::kExact);
  testing::expect_clone_continues_identically(*model_, golden_.tokens);
}

INSTANTIATE_TEST_SUITE_P(Models, CudaGolden, ::testing::Values("tiny-bf16", "odd-f32"));

// ---------------------------------------------------------------------------------------------
// CUDA against the CPU backend on one random model, through steps that mix sequences prefilling
// and decoding.

struct Step {
  std::vector<std::pair<size_t, std::vector<int32_t>>> entries;  // (sequence, its new tokens)
};

std::vector<Step> mixed_schedule(int64_t vocab) {
  std::mt19937 rng(31);
  std::uniform_int_distribution<int32_t> token(0, int32_t(vocab - 1));
  auto tokens = [&](size_t n) {
    std::vector<int32_t> t(n);
    for (int32_t& x : t) x = token(rng);
    return t;
  };
  std::vector<Step> steps;
  steps.push_back({{{0, tokens(37)}, {1, tokens(5)}}});                // two prefills
  steps.push_back({{{0, tokens(1)}, {1, tokens(20)}, {2, tokens(64)}}});  // decode beside prefills
  for (int i = 0; i < 6; ++i) steps.push_back({{{2, tokens(1)}, {0, tokens(1)}, {1, tokens(1)}}});
  steps.push_back({{{1, tokens(300)}, {0, tokens(1)}}});  // a long chunk after decoding
  return steps;
}

std::vector<float> run_schedule(Model& model, const std::vector<Step>& steps) {
  std::vector<std::unique_ptr<SequenceState>> seqs;
  for (const Step& step : steps)
    for (const auto& [seq, tokens] : step.entries)
      while (seqs.size() <= seq) seqs.push_back(model.new_sequence());
  std::vector<float> all;
  StepLogits out;
  for (const Step& step : steps) {
    std::vector<BatchEntry> batch;
    for (const auto& [seq, tokens] : step.entries) batch.push_back({seqs[seq].get(), tokens, LogitsFor::kAll});
    model.forward(batch, out);
    for (size_t e = 0; e < batch.size(); ++e)
      for (int64_t i = 0; i < out.rows(e); ++i) all.insert(all.end(), out.row(e, i).begin(), out.row(e, i).end());
  }
  return all;
}

class CudaVersusCpu : public ::testing::TestWithParam<DType> {};

TEST_P(CudaVersusCpu, MixedPrefillAndDecodeAgree) {
  M1_REQUIRE_CUDA();
  const ModelConfig config = preset("tiny").config;
  const std::vector<Step> steps = mixed_schedule(config.vocab_size);
  auto cpu_backend = create_backend(BackendOptions{"cpu", 2, Precision::kExact, false});
  Model cpu_model(config, random_checkpoint(config, GetParam(), 11), *cpu_backend);
  const std::vector<float> want = run_schedule(cpu_model, steps);
  for (Precision precision : {Precision::kExact, Precision::kFast}) {
    auto cuda_backend = create_backend(BackendOptions{"cuda", 0, precision, false});
    Model cuda_model(config, random_checkpoint(config, GetParam(), 11), *cuda_backend);
    const double err = relative_error(run_schedule(cuda_model, steps), want);
    const bool exact = precision == Precision::kExact;
    std::printf("%s weights, cuda %s vs cpu exact: relative error %.3g\n", std::string(dtype_name(GetParam())).c_str(),
                exact ? "exact" : "fast", err);
    EXPECT_LE(err, exact ? kExactBound : kFastBound) << (exact ? "exact" : "fast");
  }
}

// Decode steps replayed as CUDA graphs give the bits eager launches give, in both precisions,
// through changes of the batch, a KV cache that grows (moving memory, so graphs are recorded
// again), a prefill in between, and a context that outgrows a decode split (every 256 keys)
// between two growths of its cache: a graph recorded at 762 keys must serve 769.
TEST(CudaGraphs, ReplayedDecodeStepsMatchEagerOnes) {
  M1_REQUIRE_CUDA();
  ModelConfig config = preset("tiny").config;
  config.attn_type_list = {0, 1, 0, 1};  // two softmax layers: KV caches, split-K decode
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> token(0, int32_t(config.vocab_size - 1));
  auto tokens = [&](size_t n) {
    std::vector<int32_t> t(n);
    for (int32_t& x : t) x = token(rng);
    return t;
  };
  std::vector<Step> steps;
  steps.push_back({{{0, tokens(240)}, {1, tokens(9)}, {2, tokens(30)}}});
  for (int i = 0; i < 30; ++i) steps.push_back({{{0, tokens(1)}, {1, tokens(1)}, {2, tokens(1)}}});  // 0 passes 256 keys
  steps.push_back({{{1, tokens(50)}}});
  for (int i = 0; i < 12; ++i) steps.push_back({{{2, tokens(1)}, {1, tokens(1)}}});
  steps.push_back({{{3, tokens(760)}}});  // room for exactly 760 keys, then for 1520
  for (int i = 0; i < 14; ++i) steps.push_back({{{3, tokens(1)}}});
  for (Precision precision : {Precision::kExact, Precision::kFast}) {
    const char* precision_name = precision == Precision::kExact ? "exact" : "fast";
    SCOPED_TRACE(precision_name);
    std::vector<float> eager, replayed;
    for (bool graphs : {false, true}) {
      auto backend = create_backend(BackendOptions{"cuda", 0, precision, false, graphs});
      Model model(config, random_checkpoint(config, DType::kBF16, 3), *backend);
      (graphs ? replayed : eager) = run_schedule(model, steps);
      const cuda::StepGraphs::Stats& stats = static_cast<cuda::CudaBackend&>(*backend).graph_stats();
      std::printf("%s, graphs %s: %lld eager, %lld recorded, %lld replayed, %lld rejected steps\n", precision_name,
                  graphs ? "on" : "off", (long long)stats.eager, (long long)stats.recorded, (long long)stats.replayed,
                  (long long)stats.rejected);
      if (!graphs) continue;
      EXPECT_EQ(stats.rejected, 0);
      EXPECT_GE(stats.recorded, 4);  // the first batch, again once its caches grew, the second and third
      EXPECT_GE(stats.replayed, 40);
    }
    ASSERT_EQ(eager.size(), replayed.size());
    EXPECT_EQ(std::memcmp(eager.data(), replayed.data(), eager.size() * sizeof(float)), 0);
  }
}

// The kernels a decode step launches, counted in its CUDA graph, pinned: a launch that comes back
// (a separate sum of chunk partials, a bf16 split of x before a one-row product, the MoE's routing
// and grouping in four launches instead of one, a SiLU pass before each lightning layer, the
// experts' gate and up products in two streamed launches instead of one, a residual add apart
// from the norm after it, a SwiGLU pass before the experts' down products, qkv and the output gate
// in two launches, q, k and v in three, the tokens gathered before the experts' gate and up
// products) fails here: 141 kernels before those went, 50 now. The model's widths (320 inputs, 288 in the experts) take two chunks
// in every product, so each product folds its partials. Not a timing: the count is the structure
// of a step.
TEST(CudaGraphs, DecodeStepLaunchCountIsPinned) {
  M1_REQUIRE_CUDA();
  ModelConfig config = preset("tiny").config;
  config.hidden_size = 320;
  config.intermediate_size = 288;
  // {precision, batch, kernels per decode step}
  const std::tuple<Precision, int64_t, int64_t> cases[] = {
      {Precision::kExact, 1, 50}, {Precision::kFast, 1, 50}, {Precision::kFast, 3, 50}};
  for (const auto& [precision, batch, want] : cases) {
    auto backend = create_backend(BackendOptions{"cuda", 0, precision, false, true});
    Model model(config, random_checkpoint(config, DType::kBF16, 8), *backend);
    std::vector<std::unique_ptr<SequenceState>> states;
    StepLogits logits;
    const std::vector<int32_t> prompt = {1, 2, 3, 4, 5};
    for (int64_t b = 0; b < batch; ++b) {
      states.push_back(model.new_sequence());
      const BatchEntry entry{states.back().get(), prompt};
      model.forward(std::span(&entry, 1), logits);
    }
    std::vector<int32_t> next(size_t(batch), 7);
    std::vector<BatchEntry> step;
    for (int64_t b = 0; b < batch; ++b) step.push_back({states[size_t(b)].get(), std::span(&next[size_t(b)], 1)});
    for (int i = 0; i < 3; ++i) model.forward(step, logits);  // eager, recorded, replayed
    const cuda::StepGraphs::Stats& stats = static_cast<cuda::CudaBackend&>(*backend).graph_stats();
    std::printf("%s, batch %lld: %lld kernels per decode step\n", precision == Precision::kExact ? "exact" : "fast",
                (long long)batch, (long long)stats.kernels);
    EXPECT_EQ(stats.recorded, 1);
    EXPECT_EQ(stats.kernels, want) << (precision == Precision::kExact ? "exact" : "fast") << ", batch " << batch;
  }
}

// The graph machinery alone, with a copy out of the stage standing in for a step's kernels: a
// replay reads its own step's staged data, a replay whose calls differ from the recording's runs
// nothing and is reported (its key then runs eagerly until memory moves), and an abandoned
// recording runs nothing.
TEST(CudaStepGraphs, ReplaysStagedDataAndRejectsChangedCalls) {
  M1_REQUIRE_CUDA();
  using Mode = cuda::StepGraphs::Mode;
  const cuda::OwnedStream stream;  // declared first, destroyed after the graphs
  cuda::StepGraphs graphs(stream, true);
  test::DeviceArray<int32_t> out(4);
  // Stages `values` (in a graph step) and copies them into `out`; `call` stands for the step's
  // calls. Returns what end() said and the mode the step ran in.
  auto step = [&](uint64_t key, int32_t first, uint64_t call, bool abandon = false) {
    const std::vector<int32_t> values = {first, first + 1, first + 2, first + 3};
    graphs.begin({key});
    const Mode mode = graphs.mode();
    if (mode == Mode::kEager) {
      M1_CUDA_CHECK(cudaMemcpyAsync(out.get(), values.data(), 16, cudaMemcpyHostToDevice, stream));
    } else {
      void* staged = graphs.stage(values.data(), 16);
      graphs.note({call});
      if (mode == Mode::kRecord) M1_CUDA_CHECK(cudaMemcpyAsync(out.get(), staged, 16, cudaMemcpyDeviceToDevice, stream));
    }
    const bool ran = abandon ? !graphs.abandon() : graphs.end();
    M1_CUDA_CHECK(cudaStreamSynchronize(stream));
    return std::pair{ran, mode};
  };
  auto out_starts_at = [&](int32_t first) {
    EXPECT_EQ(out.download(), (std::vector<int32_t>{first, first + 1, first + 2, first + 3}));
  };
  EXPECT_EQ(step(7, 1, 0), std::pair(true, Mode::kEager));  // first sight of the key
  out_starts_at(1);
  EXPECT_EQ(step(7, 5, 0), std::pair(true, Mode::kRecord));
  out_starts_at(5);
  EXPECT_EQ(step(7, 9, 0), std::pair(true, Mode::kReplay));
  out_starts_at(9);
  EXPECT_EQ(step(7, 13, 1), std::pair(false, Mode::kReplay));  // other calls: nothing ran
  out_starts_at(9);
  EXPECT_EQ(step(7, 17, 0), std::pair(true, Mode::kEager));
  out_starts_at(17);
  cuda::memory_moved();  // forgets every recording, the refusal too
  EXPECT_EQ(step(7, 21, 0), std::pair(true, Mode::kRecord));
  out_starts_at(21);
  EXPECT_EQ(step(8, 25, 0), std::pair(true, Mode::kEager));
  EXPECT_EQ(step(8, 29, 0, true), std::pair(false, Mode::kRecord));  // abandoned: nothing ran
  out_starts_at(25);
  EXPECT_EQ(step(7, 33, 0), std::pair(true, Mode::kReplay));  // key 7's recording outlives key 8's steps
  out_starts_at(33);
  const cuda::StepGraphs::Stats& stats = graphs.stats();
  EXPECT_EQ(stats.eager, 3);
  EXPECT_EQ(stats.recorded, 2);
  EXPECT_EQ(stats.replayed, 2);
  EXPECT_EQ(stats.rejected, 2);
}

// The CUDA state's portable form: a snapshot taken where a prefill chunk may end (the backend's
// alignment), moved to host memory in two KV ranges and restored, resumes the prompt with the
// bits of a prefill in one piece, in both precisions; so does a prompt whose last token runs
// alone (one more than a multiple of the alignment). What the prefix cache relies on.
TEST(CudaSnapshots, ARestoredStateResumesBitForBit) {
  M1_REQUIRE_CUDA();
  ModelConfig config = preset("tiny").config;
  config.attn_type_list = {0, 1, 0, 1};
  std::mt19937 rng(9);
  std::uniform_int_distribution<int32_t> token(0, int32_t(config.vocab_size - 1));
  for (Precision precision : {Precision::kExact, Precision::kFast}) {
    SCOPED_TRACE(precision == Precision::kExact ? "exact" : "fast");
    auto backend = create_backend(BackendOptions{"cuda", 0, precision, false});
    Model model(config, random_checkpoint(config, DType::kBF16, 3), *backend);
    const int64_t align = backend->prefill_alignment();
    EXPECT_EQ(align, 128);
    for (int64_t length : {2 * align + 1, 2 * align + 44}) {
      std::vector<int32_t> prompt(static_cast<size_t>(length));
      for (int32_t& t : prompt) t = token(rng);
      // The prompt from `seq` on, cut as the engine cuts it; the last position's logits.
      auto finish = [&](SequenceState& seq, int64_t stop) {
        StepLogits out;
        for (int64_t pos = seq.length(); pos < length;) {
          const int64_t end = prefill_chunk_end(pos, length, 4096, align, stop);
          BatchEntry e{&seq, std::span(prompt).subspan(size_t(pos), size_t(end - pos)),
                       end == length ? LogitsFor::kLast : LogitsFor::kNone};
          model.forward({&e, 1}, out);
          pos = end;
          if (pos == stop) return std::vector<float>{};
        }
        auto row = out.row(0, 0);
        return std::vector<float>(row.begin(), row.end());
      };
      auto whole = model.new_sequence();
      const std::vector<float> want = finish(*whole, 0);
      auto cut = model.new_sequence();
      finish(*cut, 2 * align);
      const StateCopy snapshot = copy_state(*cut);
      std::vector<std::byte> head(cut->kv_bytes(100)), tail(cut->kv_bytes(2 * align - 100));
      cut->save_kv(0, 100, head);
      cut->save_kv(100, 2 * align, tail);
      auto restored = restore_state(model, SnapshotPieces{{{head, 100}, {tail, 2 * align - 100}}, snapshot.lightning});
      EXPECT_EQ(copy_state(*restored).kv, snapshot.kv);
      EXPECT_EQ(copy_state(*restored).lightning, snapshot.lightning);
      const std::vector<float> got = finish(*restored, 0);
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0) << "length " << length;
      EXPECT_EQ(copy_state(*restored).kv, copy_state(*whole).kv);
      EXPECT_EQ(copy_state(*restored).lightning, copy_state(*whole).lightning);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaVersusCpu, ::testing::Values(DType::kBF16, DType::kF16, DType::kF32),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace m1
