// The CUDA lightning attention kernels against the recurrent CPU oracle (lightning_reference, in
// double, on the CPU's SiLU of the same projection output: the kernels apply SiLU themselves) on
// fresh random inputs: single segments of awkward lengths, decode and prefill segments mixed in
// one call with non-zero starting states, and state carried across calls; each with fp32 operands
// (exact precision) and with bf16 prefill operands (fast precision).
// Bounds on the relative Frobenius error of outputs and final states:
//   fp32: 1e-4.
//   bf16: 1e-2. Each prefill product rounds its two operands to bf16 (relative error <= 2^-9 each,
//   about 1e-3 rms over random values) and accumulates in fp32; the errors of the many terms of a
//   sum are independent, so outputs and state increments carry about 2-4e-3. The state itself stays
//   fp32 (only its bf16 copy is an operand of Q S), so block-to-block errors add, not compound.

#include <gtest/gtest.h>

#include <cstring>
#include <tuple>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "cpu/elementwise.h"
#include "cpu/lightning.h"
#include "cuda_check.h"
#include "cuda_test_support.h"
#include "lightning.h"
#include "m1/error.h"
#include "m1/model.h"
#include "test_support.h"

namespace m1::cuda {
namespace {

constexpr double kExactBound = 1e-4;
constexpr double kBf16Bound = 1e-2;
constexpr float kUntouched = 1234.5f;  // fills output rows and columns no segment owns

using test::DeviceArray;
using testing::relative_error;
using testing::rng;

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng()); }

// The projection's output as the kernels take it: roughly unit pre-activations of q, k and v.
std::vector<float> random_qkv(size_t n) {
  std::vector<float> v(n);
  for (float& x : v) x = uniform(-2.0f, 2.0f);
  return v;
}

// What the reference reads: SiLU of the whole projection output (padding columns included).
std::vector<float> activated(std::vector<float> qkv) {
  cpu::silu_inplace(qkv.data(), int64_t(qkv.size()));
  return qkv;
}

std::vector<float> random_state(int64_t heads, int64_t d) {
  std::vector<float> s(size_t(heads * d * d));
  for (float& x : s) x = uniform(-0.5f, 0.5f);
  return s;
}

// Decays from the model's schedule (a random layer of an 80-layer model) or uniform in [0.01, 0.9].
std::vector<float> random_decay(int64_t heads, bool model_schedule) {
  if (model_schedule) return lightning_decay(heads, int64_t(uniform(0.0f, 79.99f)), 80);
  std::vector<float> s(static_cast<size_t>(heads));
  for (float& x : s) x = uniform(0.01f, 0.9f);
  return s;
}

// One layer's tensors for a run of calls: the heads' decays and each sequence's state, on the
// GPU and (as the reference's running copy) on the host. A device state starts 4 floats into its
// buffer (16-byte aligned) or 1 float in (which the decode kernel accepts only when d is not a
// multiple of 4).
struct Layer {
  int64_t heads, d;
  std::vector<float> decay;
  DeviceArray<float> device_decay;
  std::vector<std::vector<float>> states;
  std::vector<std::unique_ptr<DeviceArray<float>>> device_states;
  int64_t offset;

  Layer(int64_t heads_, int64_t d_, std::vector<float> decay_, size_t sequences, bool aligned_states = true)
      : heads(heads_), d(d_), decay(std::move(decay_)), device_decay(decay), offset(aligned_states ? 4 : 1) {
    for (size_t i = 0; i < sequences; ++i) states.push_back(random_state(heads, d));
    upload_states();
  }
  void upload_states() {
    device_states.clear();
    for (const std::vector<float>& state : states) {
      std::vector<float> padded(size_t(offset), 0.0f);
      padded.insert(padded.end(), state.begin(), state.end());
      device_states.push_back(std::make_unique<DeviceArray<float>>(padded));
    }
  }
  float* device_state_pointer(size_t i) const { return device_states[i]->get() + offset; }
  std::vector<float> device_state(size_t i) const {
    std::vector<float> s = device_states[i]->download();
    return {s.begin() + offset, s.end()};
  }
};

// One segment of a call: which sequence (state) it continues and its rows.
struct SegmentSpec {
  size_t sequence;
  int64_t row, count;
};

struct CallLayout {
  int64_t rows = 0;
  int64_t qkv_padding = 0, out_padding = 0;  // extra floats per row past heads * 3d and heads * d
  bool aligned_states = true;  // see Layer
  bool bf16_operands = false;  // the fast precision: prefill products may round operands to bf16
  bool split_segments = true;  // whether the bf16 prefill may split segments into parts
  double bound() const { return bf16_operands ? kBf16Bound : kExactBound; }
};

// Runs one lightning_attention call on the GPU and the same segments through the reference,
// updating both copies of the states. Returns {GPU output, reference output}, rows x out_stride.
std::pair<std::vector<float>, std::vector<float>> run_call(Layer& layer, const std::vector<float>& qkv,
                                                             const std::vector<SegmentSpec>& segments, const CallLayout& layout,
                                                             Device& device = test::test_device()) {
  const int64_t heads = layer.heads, d = layer.d;
  const int64_t qkv_stride = heads * 3 * d + layout.qkv_padding, out_stride = heads * d + layout.out_padding;
  std::vector<float> reference(size_t(layout.rows * out_stride), kUntouched);

  std::vector<LightningSegment> descriptors;
  for (const SegmentSpec& s : segments) descriptors.push_back({s.row, s.count, layer.device_state_pointer(s.sequence)});
  DeviceArray<float> device_qkv(qkv), device_out(reference);
  DeviceArray<LightningSegment> device_segments(descriptors);
  LightningArgs args;
  args.qkv = device_qkv.get();
  args.qkv_stride = qkv_stride;
  args.out = device_out.get();
  args.out_stride = out_stride;
  args.heads = heads;
  args.d = d;
  args.decay = layer.device_decay.get();
  args.segments = descriptors;
  args.device_segments = device_segments.get();
  args.bf16_operands = layout.bf16_operands;
  args.split_segments = layout.split_segments;
  DeviceScratch scratch(nullptr);
  lightning_attention(args, scratch, device, nullptr);
  M1_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> got = device_out.download();
  EXPECT_EQ(qkv, device_qkv.download()) << "the kernels leave qkv as it was";

  const std::vector<float> silu_qkv = activated(qkv);
  for (const SegmentSpec& s : segments)
    for (int64_t h = 0; h < heads; ++h) {
      const float* q = silu_qkv.data() + s.row * qkv_stride + h * 3 * d;
      cpu::LightningHead head{q, q + d, q + 2 * d, qkv_stride, reference.data() + s.row * out_stride + h * d, out_stride,
                              s.count, d, layer.decay[size_t(h)], layer.states[s.sequence].data() + h * d * d};
      cpu::lightning_reference(head);
    }
  return {got, reference};
}

// A call's rows: `counts` segments of sequences 0, 1, ... laid out in order with `gap` unused
// rows after each.
std::vector<SegmentSpec> lay_out(const std::vector<int64_t>& counts, int64_t gap, CallLayout& layout) {
  std::vector<SegmentSpec> segments;
  int64_t row = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    segments.push_back({i, row, counts[i]});
    row += counts[i] + gap;
  }
  layout.rows = row;
  return segments;
}

// Checks a call's output, rows x out_stride: cells no segment owns (rows between segments,
// columns past heads * d) are left as they were, and the owned cells match the reference. The
// error is over the owned cells alone: the untouched filler would swamp the norm.
void expect_outputs(const std::vector<float>& got, const std::vector<float>& want,
                    const std::vector<SegmentSpec>& segments, int64_t width, int64_t out_stride, double bound) {
  ASSERT_EQ(got.size(), want.size());
  std::vector<bool> owned(got.size(), false);
  for (const SegmentSpec& s : segments)
    for (int64_t r = s.row; r < s.row + s.count; ++r)
      for (int64_t c = 0; c < width; ++c) owned[size_t(r * out_stride + c)] = true;
  std::vector<float> got_owned, want_owned;
  size_t touched_elsewhere = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (owned[i]) {
      got_owned.push_back(got[i]);
      want_owned.push_back(want[i]);
    } else {
      touched_elsewhere += got[i] != kUntouched;
    }
  }
  EXPECT_EQ(touched_elsewhere, 0u);
  EXPECT_FALSE(got_owned.empty());
  EXPECT_LE(relative_error(got_owned, want_owned), bound) << "outputs";
}

// Runs one call of the given segments on fresh inputs and checks outputs and every state.
void check_call(int64_t heads, int64_t d, const std::vector<int64_t>& counts, int64_t gap, CallLayout layout,
                bool model_schedule) {
  const std::vector<SegmentSpec> segments = lay_out(counts, gap, layout);
  Layer layer(heads, d, random_decay(heads, model_schedule), counts.size(), layout.aligned_states);
  const std::vector<float> qkv = random_qkv(size_t(layout.rows * (heads * 3 * d + layout.qkv_padding)));
  auto [got, want] = run_call(layer, qkv, segments, layout);
  expect_outputs(got, want, segments, heads * d, heads * d + layout.out_padding, layout.bound());
  for (size_t i = 0; i < counts.size(); ++i)
    EXPECT_LE(relative_error(layer.device_state(i), layer.states[i]), layout.bound()) << "state of segment " << i;
}

std::string describe(int64_t heads, int64_t d, int64_t count) {
  return "heads " + std::to_string(heads) + " d " + std::to_string(d) + " tokens " + std::to_string(count);
}

TEST(CudaLightningTest, SingleSegmentMatchesTheRecurrence) {
  M1_REQUIRE_CUDA();
  bool model_schedule = false;
  for (int64_t heads : {1, 3, 8})
    for (int64_t d : {16, 32, 64, 128})
      for (int64_t count : {1, 2, 31, 32, 33, 63, 64, 65, 200, 1000}) {
        SCOPED_TRACE(describe(heads, d, count));
        check_call(heads, d, {count}, 0, CallLayout{}, model_schedule = !model_schedule);
      }
}

// Head dims that are not multiples of the kernels' tiles or of four, with padded row strides.
TEST(CudaLightningTest, AwkwardHeadDimsAndStrides) {
  M1_REQUIRE_CUDA();
  for (int64_t d : {1, 17, 24, 40, 100, 127})
    for (int64_t count : {1, 2, 65, 200}) {
      SCOPED_TRACE(describe(3, d, count));
      check_call(3, d, {count}, 0, CallLayout{.qkv_padding = 5, .out_padding = 3}, false);
    }
}

// Decode (one token) and prefill segments of different lengths in one call, each with its own
// starting state, with unused rows between them.
TEST(CudaLightningTest, MixedDecodeAndPrefillSegments) {
  M1_REQUIRE_CUDA();
  for (int64_t d : {16, 64, 128}) {
    SCOPED_TRACE("d " + std::to_string(d));
    check_call(8, d, {1, 65, 1, 1, 300, 2, 33, 1}, 2, CallLayout{.qkv_padding = 4, .out_padding = 4}, true);
    check_call(3, d, {200, 1, 1, 1}, 0, CallLayout{}, false);
  }
}

// A head dim that is not a multiple of 4 decodes with scalar loads, so its states need no
// alignment.
TEST(CudaLightningTest, DecodeWithUnalignedStates) {
  M1_REQUIRE_CUDA();
  for (int64_t d : {30, 127}) {
    SCOPED_TRACE("d " + std::to_string(d));
    check_call(4, d, {1, 1, 1, 40}, 1, CallLayout{.aligned_states = false}, true);
  }
}

// At a multiple of 4 the decode kernel loads float4s whatever shares the call (so a segment's
// bits never depend on its neighbours): an unaligned state is refused before anything runs.
TEST(CudaLightningTest, UnalignedDecodeStateIsAClearError) {
  M1_REQUIRE_CUDA();
  CallLayout layout{.aligned_states = false};
  const std::vector<SegmentSpec> segments = lay_out({40, 1}, 0, layout);
  Layer layer(2, 32, random_decay(2, false), segments.size(), layout.aligned_states);
  const std::vector<float> before = layer.device_state(1);
  testing::expect_error([&] { run_call(layer, random_qkv(size_t(layout.rows * 2 * 3 * 32)), segments, layout); },
                        {"segment 1", "16-byte aligned"});
  const std::vector<float> after = layer.device_state(1);
  EXPECT_EQ(0, std::memcmp(before.data(), after.data(), before.size() * sizeof(float)));
}

// Runs `calls` one after another on one sequence and compares all their outputs and the final
// state with the reference over all the tokens at once.
void check_state_carries(int64_t d, const std::vector<int64_t>& calls, bool bf16_operands) {
  const int64_t heads = 8, stride = heads * 3 * d;
  int64_t total = 0;
  for (int64_t c : calls) total += c;
  Layer layer(heads, d, random_decay(heads, true), 1);
  const std::vector<float> initial = layer.states[0];
  const std::vector<float> qkv = random_qkv(size_t(total * stride));
  std::vector<float> got;
  int64_t done = 0;
  const CallLayout base{.bf16_operands = bf16_operands};
  for (int64_t count : calls) {
    std::vector<float> rows(qkv.begin() + done * stride, qkv.begin() + (done + count) * stride);
    CallLayout layout = base;
    layout.rows = count;
    auto [out, unused] = run_call(layer, rows, {{0, 0, count}}, layout);
    got.insert(got.end(), out.begin(), out.end());
    done += count;
  }
  std::vector<float> want(size_t(total * heads * d)), state = initial;
  const std::vector<float> silu_qkv = activated(qkv);
  for (int64_t h = 0; h < heads; ++h) {
    const float* q = silu_qkv.data() + h * 3 * d;
    cpu::LightningHead head{q, q + d, q + 2 * d, stride, want.data() + h * d, heads * d,
                            total, d, layer.decay[size_t(h)], state.data() + h * d * d};
    cpu::lightning_reference(head);
  }
  EXPECT_LE(relative_error(got, want), base.bound()) << "outputs";
  EXPECT_LE(relative_error(layer.device_state(0), state), base.bound()) << "final state";
}

// Prefill 100 tokens, decode 5, prefill 37 more: the same as the reference over all 142 at once.
TEST(CudaLightningTest, StateCarriesAcrossCalls) {
  M1_REQUIRE_CUDA();
  for (int64_t d : {32, 128}) {
    SCOPED_TRACE("d " + std::to_string(d));
    check_state_carries(d, {100, 1, 1, 1, 1, 1, 37}, false);
  }
}

// The same call on two layers with the same states, the second with `second_layout` (whose rows
// are taken from the first) on `second`: both right, and the same bits (outputs and states).
void expect_same_bits(int64_t heads, int64_t d, const std::vector<int64_t>& counts, int64_t gap, CallLayout layout,
                      CallLayout second_layout, Device& second) {
  const std::vector<SegmentSpec> segments = lay_out(counts, gap, layout);
  second_layout.rows = layout.rows;
  const std::vector<float> decay = random_decay(heads, true);
  const std::vector<float> qkv = random_qkv(size_t(layout.rows * heads * 3 * d));
  Layer first_layer(heads, d, decay, segments.size()), second_layer(heads, d, decay, segments.size());
  second_layer.states = first_layer.states;
  second_layer.upload_states();
  auto [a, ref_a] = run_call(first_layer, qkv, segments, layout);
  auto [b, ref_b] = run_call(second_layer, qkv, segments, second_layout, second);
  // Bit-equal is not enough: both must also be right.
  expect_outputs(a, ref_a, segments, heads * d, heads * d, layout.bound());
  expect_outputs(b, ref_b, segments, heads * d, heads * d, layout.bound());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
  for (size_t i = 0; i < segments.size(); ++i) {
    std::vector<float> sa = first_layer.device_state(i), sb = second_layer.device_state(i);
    EXPECT_LE(relative_error(sa, first_layer.states[i]), layout.bound()) << "state " << i;
    EXPECT_EQ(0, std::memcmp(sa.data(), sb.data(), sa.size() * sizeof(float))) << "state " << i;
  }
}
void expect_same_bits(int64_t heads, int64_t d, const std::vector<int64_t>& counts, int64_t gap, CallLayout layout,
                      Device& second) {
  expect_same_bits(heads, d, counts, gap, layout, layout, second);
}

// The kernels sum in a fixed order: the same call twice gives the same bits.
void check_repeats_bit_for_bit(bool bf16_operands) {
  expect_same_bits(4, 128, {1, 150, 1}, 0, CallLayout{.bf16_operands = bf16_operands}, test::test_device());
}

TEST(CudaLightningTest, RepeatsBitForBit) {
  M1_REQUIRE_CUDA();
  check_repeats_bit_for_bit(false);
}

// Runs `counts` segments (of sequences 0, 1, ..., `gap` unused rows after each) in one call and
// checks every output and state against the recurrence, then runs the first segment alone: its
// output and state must be the batched call's to the bit.
void check_first_segment_alone(int64_t heads, int64_t d, const std::vector<int64_t>& counts, int64_t gap,
                               bool bf16_operands) {
  const int64_t stride = heads * 3 * d, count = counts[0];
  CallLayout batch_layout{.bf16_operands = bf16_operands};
  const std::vector<SegmentSpec> segments = lay_out(counts, gap, batch_layout);
  const std::vector<float> decay = random_decay(heads, true);
  const std::vector<float> qkv = random_qkv(size_t(batch_layout.rows * stride));
  Layer batched(heads, d, decay, counts.size()), alone(heads, d, decay, 1);
  alone.states[0] = batched.states[0];
  alone.upload_states();

  auto [got_batched, want] = run_call(batched, qkv, segments, batch_layout);
  expect_outputs(got_batched, want, segments, heads * d, heads * d, batch_layout.bound());
  for (size_t i = 0; i < counts.size(); ++i)
    EXPECT_LE(relative_error(batched.device_state(i), batched.states[i]), batch_layout.bound())
        << "state of segment " << i;

  const std::vector<float> rows(qkv.begin(), qkv.begin() + count * stride);
  auto [got_alone, unused] =
      run_call(alone, rows, {{0, 0, count}}, CallLayout{.rows = count, .bf16_operands = bf16_operands});
  EXPECT_EQ(0, std::memcmp(got_alone.data(), got_batched.data(), got_alone.size() * sizeof(float)));
  const std::vector<float> state_alone = alone.device_state(0), state_batched = batched.device_state(0);
  EXPECT_EQ(0, std::memcmp(state_alone.data(), state_batched.data(), state_alone.size() * sizeof(float)));
}

// At d = 128 the fp32 kernel runs a lone segment with its value columns split over two CTAs per
// head and a batch of 20 with one CTA per head: a segment's result must not depend on which, to
// the bit. The same holds for the bf16 kernel, which always splits.
void check_batch_invariance(bool bf16_operands) {
  std::vector<int64_t> counts = {150};
  for (int64_t i = 1; i < 20; ++i) counts.push_back(2 + 7 * i);
  check_first_segment_alone(8, 128, counts, 0, bf16_operands);
}

TEST(CudaLightningTest, SegmentResultDoesNotDependOnTheBatch) {
  M1_REQUIRE_CUDA();
  check_batch_invariance(false);
}

// A decode segment gets the same bits alone as beside other decode and prefill segments, at head
// dims with and without float4 loads.
TEST(CudaLightningTest, DecodeResultDoesNotDependOnTheBatch) {
  M1_REQUIRE_CUDA();
  for (int64_t d : {30, 64}) {
    SCOPED_TRACE("d " + std::to_string(d));
    check_first_segment_alone(3, d, {1, 1, 17, 1}, 1, false);
  }
}

// --- bf16 prefill operands (the fast precision) -------------------------------------------------

// d = 16, 64, 100 and 128 take the tensor-core kernel (padded to 64 or 128 features); d = 17 is
// not a multiple of 4 and takes the fp32 kernel even when bf16 is allowed. No 2-token segment
// alone here: its few outputs (32 at d = 16) are mostly q S with S of random sign, and bf16 q and S
// put about 1 draw in 1000 over 1e-2 (a Monte Carlo of this rounding: median 2.8e-3, 99.9th
// percentile 1.2e-2; at 15 tokens 4.6e-3). The mixed test below runs 2-token segments pooled.
TEST(CudaLightningTest, Bf16SingleSegmentMatchesTheRecurrence) {
  M1_REQUIRE_CUDA();
  bool model_schedule = false;
  for (int64_t heads : {1, 5})
    for (int64_t d : {16, 64, 100, 128, 17})
      for (int64_t count : {1, 15, 64, 65, 200, 1029}) {
        SCOPED_TRACE(describe(heads, d, count));
        check_call(heads, d, {count}, 0, CallLayout{.bf16_operands = true}, model_schedule = !model_schedule);
      }
}

// Decode and prefill segments in one call with gaps and padded strides; a stride that is not a
// multiple of 4 floats sends the prefill to the fp32 kernel.
TEST(CudaLightningTest, Bf16MixedDecodeAndPrefillSegments) {
  M1_REQUIRE_CUDA();
  for (int64_t d : {16, 64, 128}) {
    SCOPED_TRACE("d " + std::to_string(d));
    check_call(8, d, {1, 65, 1, 1, 300, 2, 33, 1}, 2, CallLayout{.qkv_padding = 4, .out_padding = 3, .bf16_operands = true},
               true);
    check_call(3, d, {200, 1, 1, 1, 64}, 0, CallLayout{.bf16_operands = true}, false);
    check_call(3, d, {70, 1}, 1, CallLayout{.qkv_padding = 5, .bf16_operands = true}, false);
  }
}

// Prefill 100 tokens, decode 2, prefill 129 more: the state comes back from the tensor-core kernel
// and goes into it again.
TEST(CudaLightningTest, Bf16StateCarriesAcrossCalls) {
  M1_REQUIRE_CUDA();
  for (int64_t d : {64, 128}) {
    SCOPED_TRACE("d " + std::to_string(d));
    check_state_carries(d, {100, 1, 1, 129}, true);
  }
}

// The same prefill with bf16 operands allowed and not: other bits where the tensor-core kernel
// runs (d = 64), the fp32 kernel's bits where the call falls back (d = 17; a qkv stride that is
// not a multiple of 4 floats).
TEST(CudaLightningTest, Bf16OperandsTakeTheTensorCoreKernelWhereTheyCan) {
  M1_REQUIRE_CUDA();
  for (auto [d, qkv_padding, tensor_cores] : {std::tuple{int64_t(64), int64_t(0), true}, {17, 0, false}, {64, 5, false}}) {
    SCOPED_TRACE(::testing::Message() << "d " << d << ", qkv padding " << qkv_padding);
    const int64_t heads = 2;
    CallLayout fp32{.qkv_padding = qkv_padding}, bf16{.qkv_padding = qkv_padding, .bf16_operands = true};
    const std::vector<SegmentSpec> segments = lay_out({70}, 0, fp32);
    lay_out({70}, 0, bf16);
    const std::vector<float> decay = random_decay(heads, true);
    const std::vector<float> qkv = random_qkv(size_t(fp32.rows * (heads * 3 * d + qkv_padding)));
    Layer fp32_layer(heads, d, decay, 1), bf16_layer(heads, d, decay, 1);
    bf16_layer.states = fp32_layer.states;
    bf16_layer.upload_states();
    const std::vector<float> fp32_out = run_call(fp32_layer, qkv, segments, fp32).first;
    const std::vector<float> bf16_out = run_call(bf16_layer, qkv, segments, bf16).first;
    ASSERT_EQ(fp32_out.size(), bf16_out.size());
    EXPECT_EQ(tensor_cores, std::memcmp(fp32_out.data(), bf16_out.data(), fp32_out.size() * sizeof(float)) != 0);
  }
}

TEST(CudaLightningTest, Bf16RepeatsBitForBit) {
  M1_REQUIRE_CUDA();
  check_repeats_bit_for_bit(true);
}

TEST(CudaLightningTest, Bf16SegmentResultDoesNotDependOnTheBatch) {
  M1_REQUIRE_CUDA();
  check_batch_invariance(true);
}

// A GPU with an A100's 163 KB of shared memory per block takes the tensor-core kernel with the
// compact staging ring at d > 64 (the wide one needs 212 KB there), and one with 120 KB at d = 64
// (141 KB): the same bits as the wide ring, whose tiles hold the same values. With less shared
// memory than even the compact ring needs, the call fails clearly.
TEST(CudaLightningTest, Bf16CompactStagingRingGivesTheSameBits) {
  M1_REQUIRE_CUDA();
  auto device_with_shared = [](int bytes) {
    return Device(test::test_device().index(), DeviceLimits{test::test_device().limits().sms, bytes});
  };
  Device a100 = device_with_shared(163 * 1024), small = device_with_shared(120 * 1024);
  const CallLayout layout{.bf16_operands = true};
  for (int64_t d : {64, 100, 128}) {
    SCOPED_TRACE("d " + std::to_string(d));
    expect_same_bits(3, d, {200, 1, 77}, 1, layout, a100);
    if (d <= 64) {
      expect_same_bits(3, d, {130}, 0, layout, small);
      continue;
    }
    CallLayout one = layout;
    const std::vector<SegmentSpec> segments = lay_out({70}, 0, one);
    Layer layer(2, d, random_decay(2, true), 1);
    testing::expect_error([&] { run_call(layer, random_qkv(size_t(one.rows * 2 * 3 * d)), segments, one, small); },
                          {"lightning prefill at head dim", "bytes of shared memory per block", "allows 122880"});
  }
}

// Decode rows of one rank's 8 heads spread over more SMs by slicing the value columns (needs no
// GPU): 8 slices at d = 128 and 64 (two warps each), halves only where d's column groups allow
// them.
TEST(CudaLightningTest, DecodeSlicesFillTheSms) {
  EXPECT_EQ(lightning_decode_slices(1, 64, 128, 132), 2);
  EXPECT_EQ(lightning_decode_slices(32, 64, 128, 132), 1);
  EXPECT_EQ(lightning_decode_slices(1, 8, 128, 132), 8);
  EXPECT_EQ(lightning_decode_slices(1, 8, 64, 132), 8);
  EXPECT_EQ(lightning_decode_slices(1, 8, 100, 132), 1);  // 25 column groups of 4: no halves
  EXPECT_EQ(lightning_decode_slices(1, 8, 98, 132), 2);   // 98 column groups of 1: 49, then no halves
  EXPECT_EQ(lightning_decode_slices(1, 8, 16, 132), 1);   // 4 groups of 16 lanes: halves would be one warp
  EXPECT_EQ(lightning_decode_slices(3, 2, 128, 1), 1);
}

// Decode rows give the same bits however many slices of the value columns their CTAs take: 3
// rows of 2 heads on 132 SMs (8 slices at d = 128 and 64, 2 at d = 98, 4 at d = 32) and on 1 SM
// (unsliced), beside a prefill segment.
TEST(CudaLightningTest, DecodeSlicesGiveTheSameBits) {
  M1_REQUIRE_CUDA();
  Device one_sm = test::device_with_sms(1);
  for (int64_t d : {128, 64, 98, 32}) {
    SCOPED_TRACE("d " + std::to_string(d));
    EXPECT_GT(lightning_decode_slices(3, 2, d, test::test_device().limits().sms), 1);
    EXPECT_EQ(lightning_decode_slices(3, 2, d, 1), 1);
    expect_same_bits(2, d, {1, 1, 70, 1}, 1, CallLayout{}, one_sm);
  }
}

// Needs no GPU. A call whose (segment, head) CTAs fill the SMs stays whole. One rank's 8 heads of
// 8-way tensor parallelism split a long segment into parts of whole 64-token blocks, about one CTA
// per SM but never more CTAs than SMs (each takes a whole SM), and leave short segments and decode
// tokens whole. A split whose blocks' state terms would pass the memory bound splits nothing.
TEST(CudaLightningTest, PrefillPartsFillTheSms) {
  auto plan = [](const std::vector<int64_t>& counts, int64_t heads, int64_t d, int sms) {
    std::vector<LightningSegment> segments;
    for (int64_t count : counts) segments.push_back({0, count, nullptr});
    return lightning_prefill_parts(segments, heads, d, sms);
  };
  using Blocks = std::vector<int64_t>;
  EXPECT_EQ(plan({8192}, 64, 128, 132), Blocks{0});
  EXPECT_EQ(plan({8192}, 66, 128, 132), Blocks{0});
  EXPECT_EQ(plan({512}, 8, 128, 132), Blocks{2});     // 8 blocks, 4 parts: 64 CTAs
  EXPECT_EQ(plan({8192}, 8, 128, 132), Blocks{16});   // 128 blocks, 8 parts: 128 CTAs
  EXPECT_EQ(plan({8192}, 32, 128, 132), Blocks{64});  // parts of 63 would make 3 of 64 CTAs each
  EXPECT_EQ(plan({8192, 1, 100, 0}, 8, 128, 132), (Blocks{19, 0, 0, 0}));  // 7 x 16 + 16 CTAs
  EXPECT_EQ(plan({256, 256}, 8, 64, 132), (Blocks{2, 2}));
  EXPECT_EQ(plan({200, 8192}, 8, 64, 132), (Blocks{0, 9}));  // 4 blocks stay whole: 8 + 15 x 8 CTAs
  EXPECT_EQ(plan({1 << 20}, 8, 128, 132), Blocks{0});        // 8 GB of block terms
}

// Segments split into parts give the bits of the same call with every segment whole: the kernel
// composes the state block by block as the scan over the blocks' terms does. With 2 heads:
// 257 tokens (on 132 SMs, parts of 2, 2 and 1 blocks, the last of one token) and 1100 beside a
// segment that stays whole and decode tokens; on a GPU of 20 SMs the parts are longer (3 or 6
// blocks) and the shorter segment stays whole too. d = 64, 100 and 128.
TEST(CudaLightningTest, Bf16SplitSegmentsGiveTheBitsOfWholeOnes) {
  M1_REQUIRE_CUDA();
  const std::vector<int64_t> counts = {257, 1, 1100, 100, 1};
  const CallLayout whole{.bf16_operands = true, .split_segments = false}, split{.bf16_operands = true};
  for (int sms : {132, 20}) {
    Device device = test::device_with_sms(sms);
    for (int64_t d : {64, 100, 128}) {
      SCOPED_TRACE("d " + std::to_string(d) + ", " + std::to_string(sms) + " SMs");
      std::vector<LightningSegment> segments;
      for (int64_t count : counts) segments.push_back({0, count, nullptr});
      const std::vector<int64_t> parts = lightning_prefill_parts(segments, 2, d, sms);
      EXPECT_GT(parts[2], 0) << "the 1100-token segment splits";
      EXPECT_EQ(parts[3], 0) << "the 100-token segment stays whole";
      expect_same_bits(2, d, counts, 1, whole, split, device);
    }
  }
}

// Needs no GPU: the head dim is checked before any CUDA call.
TEST(CudaLightningTest, RejectsUnsupportedHeadDims) {
  for (int64_t d : {0, 129, 256}) {
    LightningSegment segment{0, 4, nullptr};
    LightningArgs args;
    args.heads = 1;
    args.d = d;
    args.segments = std::span<const LightningSegment>(&segment, 1);
    SCOPED_TRACE(d);
    DeviceScratch scratch(nullptr);
    testing::expect_error([&] { lightning_attention(args, scratch, test::test_device(), nullptr); }, {"head dim"});
  }
}

}  // namespace
}  // namespace m1::cuda
