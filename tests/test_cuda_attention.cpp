// The GPU softmax attention against the CPU oracle (m1::cpu::apply_rope and
// attention_group_reference) on fresh random inputs. The GPU keeps its KV cache in bf16, so the
// oracle attends over the CPU-rotated keys and the values rounded to bf16 the same way; what is left
// is fp32 accumulation order (and q and the softmax weights carried as bf16 high + low parts, 16
// significant bits), bounded by 1e-4 relative Frobenius error. Fast precision rounds q and the
// weights to bf16 once (8 significant bits, relative error up to 2^-9 each); with unit-normal
// inputs that leaves about 2e-3, bounded by 1e-2. Rotated q and k must match apply_rope to 1e-6 and
// the cache must hold exactly the bf16 rounding of the rotated keys.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

#include "attention.h"
#include "cpu/softmax_attention.h"
#include "cuda_check.h"
#include "cuda_test_support.h"
#include "device_scratch.h"
#include "m1/dtype.h"
#include "m1/error.h"
#include "test_support.h"

namespace m1::cuda {
namespace {

constexpr double kOutputBound = 1e-4;      // relative Frobenius, attention output vs the fp64 oracle
constexpr double kFastOutputBound = 1e-2;  // the same with q and the softmax weights rounded to bf16
constexpr double kRopeBound = 1e-6;        // relative Frobenius, rotated q and k vs apply_rope
constexpr uint16_t kUnwritten = 0x7fc0;    // bf16 NaN in cache rows not yet written: reading them shows

using test::DeviceArray;
using testing::random_floats;
using testing::relative_error;
using testing::rng;

struct Shape {
  int64_t heads, kv_heads, d, rotary_dim;
  double theta = 10000.0;
  int64_t q_width() const { return heads * d; }
  int64_t kv_width() const { return kv_heads * d; }
};

// One sequence's cache of one layer on the device, with two host views of it: what the device
// must hold (`stored_keys`, keys rotated on the GPU) and what the oracle attends over (`keys`,
// keys rotated on the CPU); they can differ where a rounding tie breaks differently. Values are
// the same in both. Rows past `length` hold NaN until written.
struct Cache {
  int64_t kv_width, length = 0;
  std::vector<uint16_t> keys, stored_keys, values;
  DeviceArray<uint16_t> device_keys, device_values;

  Cache(int64_t kv_width_, int64_t capacity)
      : kv_width(kv_width_),
        keys(size_t(kv_width_ * capacity), kUnwritten),
        stored_keys(keys),
        values(keys),
        device_keys(keys),
        device_values(values) {}
  // Earlier tokens: `rows` rows of random values, as if written by earlier steps.
  void fill_prefix(int64_t rows, uint64_t seed) {
    std::mt19937_64 gen(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (size_t i = 0; i < size_t(rows * kv_width); ++i) {
      keys[i] = stored_keys[i] = f32_to_bf16(normal(gen));
      values[i] = f32_to_bf16(normal(gen));
    }
    length = rows;
    device_keys.upload(keys);
    device_values.upload(values);
  }
  std::vector<float> as_floats(const std::vector<uint16_t>& bits, int64_t rows) const {
    std::vector<float> out(size_t(rows * kv_width));
    for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_f32(bits[i]);
    return out;
  }
};

// One segment of a step: its cache and its rows of q, k, v (packed, heads * d per row).
struct Entry {
  Cache* cache;
  int64_t count;
  std::vector<float> q, k, v;
};

Entry make_entry(const Shape& s, Cache& cache, int64_t count) {
  return Entry{&cache, count, random_floats(size_t(count * s.q_width())), random_floats(size_t(count * s.kv_width())),
               random_floats(size_t(count * s.kv_width()))};
}

struct EntryResult {
  std::vector<float> q, k, out;
};

// Copies rows of `width` packed values into a strided matrix at row `row0`.
void place_rows(const std::vector<float>& rows, int64_t width, std::vector<float>& strided, int64_t stride, int64_t row0) {
  for (size_t i = 0; i < rows.size() / size_t(width); ++i)
    std::copy_n(rows.begin() + int64_t(i) * width, width, strided.begin() + (row0 + int64_t(i)) * stride);
}
// True when the columns [width, stride) of every row are the same in both: nothing wrote past a row.
bool padding_untouched(const std::vector<float>& before, const std::vector<float>& after, int64_t stride, int64_t width) {
  for (size_t i = 0; i < before.size(); ++i)
    if (int64_t(i) % stride >= width && std::memcmp(&before[i], &after[i], sizeof(float)) != 0) return false;
  return true;
}
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
std::vector<float> take_rows(const std::vector<float>& strided, int64_t stride, int64_t row0, int64_t count, int64_t width) {
  std::vector<float> rows(size_t(count * width));
  for (int64_t i = 0; i < count; ++i)
    std::copy_n(strided.begin() + (row0 + i) * stride, width, rows.begin() + i * width);
  return rows;
}

struct StepOptions {
  bool fast = false;              // AttentionArgs::bf16_operands, checked against kFastOutputBound
  bool declare_capacity = false;  // each segment tells its cache's whole room (AttentionSegment::capacity)
  Device* device = nullptr;       // the GPU as the kernels see it; the test device when null
  PrefillChoices prefill = {};    // AttentionArgs::prefill
};

// Runs one step of `entries` (in this order of rows) on the GPU, checks it against the oracle,
// advances the caches and returns the GPU's rotated q, k and output per entry.
std::vector<EntryResult> run_step(const Shape& s, const std::vector<Entry>& entries, DeviceScratch& scratch,
                                  StepOptions options = {}) {
  // Odd strides with random padding, so a stride mix-up shows.
  const int64_t q_stride = s.q_width() + 3, k_stride = s.kv_width() + 1, v_stride = s.kv_width() + 2,
                out_stride = s.q_width() + 5;
  int64_t rows = 0;
  std::vector<AttentionSegment> segments;
  for (const Entry& e : entries) {
    const int64_t capacity = options.declare_capacity ? int64_t(e.cache->keys.size()) / s.kv_width() : 0;
    segments.push_back(
        {rows, e.count, e.cache->length, e.cache->device_keys.get(), e.cache->device_values.get(), capacity});
    rows += e.count;
  }
  std::vector<float> q = random_floats(size_t(rows * q_stride)), k = random_floats(size_t(rows * k_stride)),
                     v = random_floats(size_t(rows * v_stride)), out(size_t(rows * out_stride), 0.0f);
  for (size_t i = 0; i < entries.size(); ++i) {
    place_rows(entries[i].q, s.q_width(), q, q_stride, segments[i].row);
    place_rows(entries[i].k, s.kv_width(), k, k_stride, segments[i].row);
    place_rows(entries[i].v, s.kv_width(), v, v_stride, segments[i].row);
  }
  DeviceArray<float> dq(q), dk(k), dv(v), dout(out);
  DeviceArray<AttentionSegment> dsegments(segments);

  AttentionArgs args;
  args.q = dq.get();
  args.q_stride = q_stride;
  args.k = dk.get();
  args.k_stride = k_stride;
  args.v = dv.get();
  args.v_stride = v_stride;
  args.out = dout.get();
  args.out_stride = out_stride;
  args.heads = s.heads;
  args.kv_heads = s.kv_heads;
  args.d = s.d;
  args.rotary_dim = s.rotary_dim;
  args.rope_theta = s.theta;
  args.segments = segments;
  args.device_segments = dsegments.get();
  args.bf16_operands = options.fast;
  args.prefill = options.prefill;
  softmax_attention(args, scratch, options.device ? *options.device : test::test_device(), nullptr);
  M1_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> gpu_q = dq.download(), gpu_k = dk.download(), gpu_out = dout.download();
  EXPECT_TRUE(padding_untouched(q, gpu_q, q_stride, s.q_width()));
  EXPECT_TRUE(padding_untouched(k, gpu_k, k_stride, s.kv_width()));
  EXPECT_TRUE(padding_untouched(out, gpu_out, out_stride, s.q_width()));

  const int64_t group = s.heads / s.kv_heads, kv_width = s.kv_width();
  std::vector<EntryResult> results;
  for (size_t i = 0; i < entries.size(); ++i) {
    const Entry& e = entries[i];
    Cache& cache = *e.cache;
    const int64_t row = segments[i].row, pos0 = cache.length, count = e.count;
    SCOPED_TRACE(::testing::Message() << "segment " << i << ": " << count << " rows at position " << pos0);
    EntryResult got{take_rows(gpu_q, q_stride, row, count, s.q_width()), take_rows(gpu_k, k_stride, row, count, kv_width),
                    take_rows(gpu_out, out_stride, row, count, s.q_width())};

    // The oracle: rotate on the CPU, append as bf16, attend in double.
    std::vector<float> q_ref = e.q, k_ref = e.k, out_ref(size_t(count * s.q_width()));
    cpu::apply_rope(q_ref.data(), count, s.q_width(), s.heads, s.d, s.rotary_dim, s.theta, pos0);
    cpu::apply_rope(k_ref.data(), count, kv_width, s.kv_heads, s.d, s.rotary_dim, s.theta, pos0);
    EXPECT_LT(relative_error(got.q, q_ref), kRopeBound);
    EXPECT_LT(relative_error(got.k, k_ref), kRopeBound);

    // The device cache: earlier rows and rows past this step untouched, new rows the bf16 of
    // what the GPU rotated (and of v).
    for (int64_t j = 0; j < count * kv_width; ++j) {
      cache.stored_keys[size_t(pos0 * kv_width + j)] = f32_to_bf16(got.k[size_t(j)]);
      cache.keys[size_t(pos0 * kv_width + j)] = f32_to_bf16(k_ref[size_t(j)]);
      cache.values[size_t(pos0 * kv_width + j)] = f32_to_bf16(e.v[size_t(j)]);
    }
    EXPECT_TRUE(cache.device_keys.download() == cache.stored_keys) << "key cache";
    EXPECT_TRUE(cache.device_values.download() == cache.values) << "value cache";

    const std::vector<float> keys = cache.as_floats(cache.keys, pos0 + count),
                             values = cache.as_floats(cache.values, pos0 + count);
    for (int64_t h = 0; h < s.kv_heads; ++h) {
      cpu::AttentionGroup g{q_ref.data() + h * group * s.d, s.q_width(), group, keys.data() + h * s.d,
                            values.data() + h * s.d, kv_width, out_ref.data() + h * group * s.d, s.q_width(),
                            count, pos0, s.d};
      cpu::attention_group_reference(g);
    }
    EXPECT_LT(relative_error(got.out, out_ref), options.fast ? kFastOutputBound : kOutputBound);
    cache.length += count;
    results.push_back(std::move(got));
  }
  return results;
}

TEST(CudaAttention, PrefillLengths) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  const Shape s{8, 2, 128, 64};
  for (bool fast : {false, true})
    for (int64_t count : {1, 2, 63, 64, 65, 300}) {
      SCOPED_TRACE(::testing::Message() << (fast ? "fast" : "exact") << " prefill of " << count);
      Cache cache(s.kv_width(), count + 5);
      run_step(s, {make_entry(s, cache, count)}, scratch, {.fast = fast});
    }
}

TEST(CudaAttention, PrefillThenDecode) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  const Shape s{16, 2, 128, 64};
  Cache cache(s.kv_width(), 130);
  run_step(s, {make_entry(s, cache, 100)}, scratch);
  for (int step = 0; step < 20; ++step) {
    SCOPED_TRACE(::testing::Message() << "decode step " << step);
    run_step(s, {make_entry(s, cache, 1)}, scratch);
  }
}

TEST(CudaAttention, MixedSegments) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  const Shape s{16, 4, 64, 64};
  struct Spec {
    int64_t pos0, count;
  };
  const std::vector<Spec> specs = {{0, 65}, {37, 1}, {300, 130}, {1000, 1}, {5, 2}, {0, 1}, {70, 64}};
  std::vector<std::unique_ptr<Cache>> caches;
  std::vector<Entry> entries;
  for (const Spec& spec : specs) {
    caches.push_back(std::make_unique<Cache>(s.kv_width(), spec.pos0 + spec.count + 3));
    caches.back()->fill_prefix(spec.pos0, rng()());
    entries.push_back(make_entry(s, *caches.back(), spec.count));
  }
  run_step(s, entries, scratch);
}

// One step of a segment of `rows` rows after `prefix` cached keys beside a decode row after
// `context` cached keys, each cache with 10 keys of room to spare.
void prefill_beside_decode(const Shape& s, int64_t prefix, int64_t rows, int64_t context, DeviceScratch& scratch,
                           bool fast) {
  Cache prefill(s.kv_width(), prefix + rows + 10), decode(s.kv_width(), context + 10);
  prefill.fill_prefix(prefix, rng()());
  decode.fill_prefix(context, rng()());
  run_step(s, {make_entry(s, prefill, rows), make_entry(s, decode, 1)}, scratch, {.fast = fast});
}

TEST(CudaAttention, GroupsAndHeadDims) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  for (int64_t group : {1, 2, 4, 8})
    for (int64_t d : {16, 64, 128})
      for (int64_t rotary : {d, d / 2}) {
        SCOPED_TRACE(::testing::Message() << "group " << group << ", d " << d << ", rotary " << rotary);
        prefill_beside_decode(Shape{2 * group, 2, d, rotary}, 20, 71, 300, scratch, false);
      }
}

TEST(CudaAttention, WideHeadsAndWideGroups) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  for (bool fast : {false, true}) {
    SCOPED_TRACE(fast ? "fast" : "exact");
    {
      SCOPED_TRACE("d 256");
      prefill_beside_decode(Shape{4, 2, 256, 128}, 9, 70, 600, scratch, fast);
    }
    {
      SCOPED_TRACE("32 query heads on one kv head (two blocks of 16 in decode)");
      prefill_beside_decode(Shape{32, 1, 64, 32}, 3, 21, 200, scratch, fast);
    }
  }
}

TEST(CudaAttention, FastGroupsAndHeadDims) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  // Groups of 1, 3 and 8 query heads per kv head; head dims that end on half an mma step (24, 40)
  // beside 64 and 128; prefill rows that are not whole CTAs beside decode rows in one step.
  for (int64_t group : {1, 3, 8})
    for (int64_t d : {24, 40, 64, 128}) {
      SCOPED_TRACE(::testing::Message() << "group " << group << ", d " << d);
      const Shape s{2 * group, 2, d, d / 2};
      Cache prefill(s.kv_width(), 100), decode(s.kv_width(), 1010), fresh(s.kv_width(), 140);
      prefill.fill_prefix(20, rng()());
      decode.fill_prefix(1000, rng()());
      run_step(s, {make_entry(s, prefill, 71), make_entry(s, decode, 1), make_entry(s, fresh, 130)}, scratch,
               {.fast = true});
    }
}

TEST(CudaAttention, LongDecodeSplits) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  // 20,000 keys take 40 splits of 512; 5,000 take 20 of 256.
  const Shape s{16, 2, 128, 64, 1e7};
  for (bool fast : {false, true}) {
    SCOPED_TRACE(fast ? "fast" : "exact");
    Cache longer(s.kv_width(), 20001), shorter(s.kv_width(), 5001);
    longer.fill_prefix(19999, rng()());
    shorter.fill_prefix(4999, rng()());
    run_step(s, {make_entry(s, longer, 1), make_entry(s, shorter, 1)}, scratch, {.fast = fast});
  }
}

TEST(CudaAttention, PositionsNearOneMillion) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  // RoPE angles near 1M radians and a decode over 2^20 + 1 keys: 2,049 splits of 512.
  const Shape s{2, 1, 64, 32, 1e7};
  const int64_t pos0 = (int64_t(1) << 20) - 3;
  Cache cache(s.kv_width(), pos0 + 4);
  cache.fill_prefix(pos0, rng()());
  run_step(s, {make_entry(s, cache, 3)}, scratch);
  run_step(s, {make_entry(s, cache, 1)}, scratch);
}

TEST(CudaAttention, BatchInvariance) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  // A prefill and a decode segment, each alone, then both beside other segments: bit-identical,
  // in either precision. The same inputs in the two precisions must differ: the choice reaches the
  // kernels.
  const Shape s{16, 2, 128, 64};
  const uint64_t prefill_seed = rng()(), decode_seed = rng()();
  Cache unused(s.kv_width(), 1);
  Entry prefill = make_entry(s, unused, 70), decode = make_entry(s, unused, 1);
  std::vector<float> prefill_out[2], decode_out[2];
  for (bool fast : {false, true}) {
    SCOPED_TRACE(fast ? "fast" : "exact");
    Cache prefill_alone(s.kv_width(), 110), prefill_shared(s.kv_width(), 110);
    Cache decode_alone(s.kv_width(), 901), decode_shared(s.kv_width(), 901);
    prefill_alone.fill_prefix(33, prefill_seed);
    prefill_shared.fill_prefix(33, prefill_seed);
    decode_alone.fill_prefix(900, decode_seed);
    decode_shared.fill_prefix(900, decode_seed);
    Cache other1(s.kv_width(), 200), other2(s.kv_width(), 3000), other3(s.kv_width(), 50);
    other1.fill_prefix(17, rng()());
    other2.fill_prefix(2999, rng()());

    prefill.cache = &prefill_alone;
    decode.cache = &decode_alone;
    const EntryResult prefill_result = run_step(s, {prefill}, scratch, {.fast = fast})[0];
    const EntryResult decode_result = run_step(s, {decode}, scratch, {.fast = fast})[0];
    prefill.cache = &prefill_shared;
    decode.cache = &decode_shared;
    const std::vector<EntryResult> shared =
        run_step(s, {make_entry(s, other1, 90), prefill, make_entry(s, other2, 1), decode, make_entry(s, other3, 40)},
                 scratch, {.fast = fast});

    EXPECT_TRUE(same_bits(prefill_result.out, shared[1].out)) << "prefill output";
    EXPECT_TRUE(same_bits(prefill_result.q, shared[1].q)) << "prefill rotated q";
    EXPECT_TRUE(same_bits(decode_result.out, shared[3].out)) << "decode output";
    EXPECT_TRUE(same_bits(decode_result.q, shared[3].q)) << "decode rotated q";
    EXPECT_TRUE(prefill_alone.device_keys.download() == prefill_shared.device_keys.download());
    EXPECT_TRUE(prefill_alone.device_values.download() == prefill_shared.device_values.download());
    EXPECT_TRUE(decode_alone.device_keys.download() == decode_shared.device_keys.download());
    EXPECT_TRUE(decode_alone.device_values.download() == decode_shared.device_values.download());
    prefill_out[fast] = prefill_result.out;
    decode_out[fast] = decode_result.out;
  }
  EXPECT_FALSE(same_bits(prefill_out[0], prefill_out[1])) << "fast prefill gave the exact bits";
  EXPECT_FALSE(same_bits(decode_out[0], decode_out[1])) << "fast decode gave the exact bits";
}

// A step of few prefill CTAs takes narrow ones (2 warps) on a GPU of 132 SMs, and the full width
// (8 warps fast, 4 exact) on a GPU of one SM: the same bits in either precision. One kv head's 8
// query heads, as one rank's under 8-way tensor parallelism, prefilling 150 rows at depth 300
// (rows whose last keys fall in different tiles of the wide CTA) and 33 rows from the start.
TEST(CudaAttention, NarrowPrefillCtasGiveTheSameBits) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  Device one_sm = test::device_with_sms(1);
  Device many_sms = test::device_with_sms(132);
  const Shape s{8, 1, 128, 64};
  for (bool fast : {false, true}) {
    SCOPED_TRACE(fast ? "fast" : "exact");
    const AttentionSegment rows[] = {{.count = 150}, {.count = 33}};
    ASSERT_EQ(plan_prefill(rows, s.heads, s.kv_heads, s.d, fast, many_sms.limits()).warps, 2);
    ASSERT_EQ(plan_prefill(rows, s.heads, s.kv_heads, s.d, fast, one_sm.limits()).warps, fast ? 8 : 4);
    const uint64_t seed = rng()();
    Cache deep_wide(s.kv_width(), 500), deep_narrow(s.kv_width(), 500), fresh_wide(s.kv_width(), 40),
        fresh_narrow(s.kv_width(), 40);
    deep_wide.fill_prefix(300, seed);
    deep_narrow.fill_prefix(300, seed);
    Entry deep = make_entry(s, deep_wide, 150), fresh = make_entry(s, fresh_wide, 33);
    const std::vector<EntryResult> wide = run_step(s, {deep, fresh}, scratch, {.fast = fast, .device = &one_sm});
    deep.cache = &deep_narrow;
    fresh.cache = &fresh_narrow;
    const std::vector<EntryResult> narrow = run_step(s, {deep, fresh}, scratch, {.fast = fast, .device = &many_sms});
    for (size_t i = 0; i < 2; ++i) EXPECT_TRUE(same_bits(wide[i].out, narrow[i].out)) << "segment " << i;
  }
}

// The K/V tiles stream through 2 or 3 stages of shared memory: the same bits, wide (a GPU of one
// SM) and narrow (132 SMs), in both precisions, for rows whose keys span many tiles (depth 300 and
// 500: 9 to 12 tiles) and rows from the start, at head dims 128 and 256 (tiles of 64 and 32 keys)
// and 40 (padding columns).
TEST(CudaAttention, KvStagesGiveTheSameBits) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  Device one_sm = test::device_with_sms(1), many_sms = test::device_with_sms(132);
  for (const Shape& s : {Shape{8, 1, 128, 64}, Shape{4, 2, 256, 32}, Shape{6, 3, 40, 40}}) {
    for (bool fast : {false, true})
      for (Device* device : {&one_sm, &many_sms}) {
        const bool wide = device == &one_sm;
        SCOPED_TRACE(fmt::format("d {}, {}, {}", s.d, fast ? "fast" : "exact", wide ? "wide" : "narrow"));
        const AttentionSegment rows[] = {{.count = 70}, {.count = 19}};
        ASSERT_EQ(plan_prefill(rows, s.heads, s.kv_heads, s.d, fast, device->limits()).warps == 2, !wide);
        const uint64_t seed = rng()();
        Cache deep[2] = {{s.kv_width(), 600}, {s.kv_width(), 600}}, fresh[2] = {{s.kv_width(), 40}, {s.kv_width(), 40}};
        for (Cache& c : deep) c.fill_prefix(s.d == 256 ? 300 : 500, seed);
        Entry long_rows = make_entry(s, deep[0], 70), short_rows = make_entry(s, fresh[0], 19);
        const std::vector<EntryResult> two =
            run_step(s, {long_rows, short_rows}, scratch, {.fast = fast, .device = device, .prefill = {.kv_stages = 2}});
        long_rows.cache = &deep[1];
        short_rows.cache = &fresh[1];
        const std::vector<EntryResult> three =
            run_step(s, {long_rows, short_rows}, scratch, {.fast = fast, .device = device, .prefill = {.kv_stages = 3}});
        for (size_t i = 0; i < 2; ++i) EXPECT_TRUE(same_bits(two[i].out, three[i].out)) << "segment " << i;
      }
  }
}

// A step of three segments, run again on fresh caches with the same inputs: 70 rows after `depth`
// cached keys, 19 rows from the start and a decode row after `decode_depth` keys.
struct DeepStep {
  Shape s;
  int64_t depth, decode_depth;
  uint64_t deep_seed = rng()(), decode_seed = rng()();
  Cache unused;
  Entry deep, fresh, decode;

  DeepStep(const Shape& shape, int64_t depth_, int64_t decode_depth_)
      : s(shape),
        depth(depth_),
        decode_depth(decode_depth_),
        unused(shape.kv_width(), 1),
        deep(make_entry(shape, unused, 70)),
        fresh(make_entry(shape, unused, 19)),
        decode(make_entry(shape, unused, 1)) {}
  std::vector<EntryResult> run(DeviceScratch& scratch, bool fast, Device* device, PrefillChoices choices) {
    Cache deep_cache(s.kv_width(), depth + 100), fresh_cache(s.kv_width(), 30),
        decode_cache(s.kv_width(), decode_depth + 10);
    deep_cache.fill_prefix(depth, deep_seed);
    decode_cache.fill_prefix(decode_depth, decode_seed);
    deep.cache = &deep_cache;
    fresh.cache = &fresh_cache;
    decode.cache = &decode_cache;
    return run_step(s, {deep, fresh, decode}, scratch, {.fast = fast, .device = device, .prefill = choices});
  }
};

// Rows deeper than one chunk (chunks of 128 keys here: two tiles of 64, or four of 32) fold their
// chunks' states left to right: in registers as a CTA walks them, or from scratch when CTAs take one
// chunk each, in windows of 1 or 2 chunks, of as many as a small scratch budget holds, or as
// planned for 132 SMs. Every form gives the same bits, and so do narrow CTAs, in both precisions;
// each run is also held to the oracle's bound. The long rows sit at depth 500-569 (5 chunks,
// crossing the boundary at 512) beside rows from the start and a decode row, whose split partials
// share the scratch. Against the default chunk size the short rows keep their bits and the long
// ones do not: the chunks are really folded.
TEST(CudaAttention, SplitPrefillGivesTheSameBits) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  Device one_sm = test::device_with_sms(1), many_sms = test::device_with_sms(132);
  constexpr int64_t kChunk = 128;
  for (const Shape& s : {Shape{8, 1, 128, 64}, Shape{6, 3, 40, 40}}) {
    for (bool fast : {false, true}) {
      const AttentionSegment rows[] = {{.count = 70, .pos0 = 500}, {.row = 70, .count = 19}, {.row = 89, .count = 1, .pos0 = 300}};
      const PrefillPlan wide = plan_prefill(rows, s.heads, s.kv_heads, s.d, fast, one_sm.limits(), {.chunk_keys = kChunk});
      ASSERT_EQ(wide.window, 0);
      ASSERT_EQ(wide.chunks, 5);
      const PrefillPlan planned =
          plan_prefill(rows, s.heads, s.kv_heads, s.d, fast, many_sms.limits(), {.chunk_keys = kChunk});
      ASSERT_EQ(planned.window, 5);  // all 5 chunks in one launch
      // Room for two chunks' states beside the folded ones.
      const size_t chunk_bytes = size_t(s.kv_heads * wide.ctas * 16 * wide.warps * (s.d + 2)) * sizeof(float);
      Device tight = test::device_with_sms(132, 3 * chunk_bytes);
      ASSERT_EQ(plan_prefill(rows, s.heads, s.kv_heads, s.d, fast, tight.limits(), {.chunk_keys = kChunk}).window, 2);

      struct Form {
        const char* name;
        Device* device;
        int64_t split;
      };
      const Form forms[] = {{"wide, folded in registers", &one_sm, -1},
                            {"narrow, folded in registers", &many_sms, -1},
                            {"split, windows of 1", &one_sm, 1},
                            {"split, windows of 2", &one_sm, 2},
                            {"split, windows the budget holds", &tight, 0},
                            {"split as planned", &many_sms, 0}};
      DeepStep step(s, 500, 300);
      const auto run = [&](Device* device, PrefillChoices choices) { return step.run(scratch, fast, device, choices); };
      std::vector<EntryResult> first;
      for (const Form& form : forms) {
        SCOPED_TRACE(fmt::format("d {}, {}, {}", s.d, fast ? "fast" : "exact", form.name));
        const std::vector<EntryResult> got = run(form.device, {.chunk_keys = kChunk, .split = form.split});
        if (first.empty()) first = got;
        for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(same_bits(first[i].out, got[i].out)) << "segment " << i;
      }
      SCOPED_TRACE(fmt::format("d {}, {}, chunks of {}", s.d, fast ? "fast" : "exact", kPrefillChunkKeys));
      const std::vector<EntryResult> whole = run(&one_sm, {});
      EXPECT_FALSE(same_bits(first[0].out, whole[0].out)) << "the long rows were not cut into chunks";
      EXPECT_TRUE(same_bits(first[1].out, whole[1].out)) << "rows within one chunk changed";
    }
  }
}

// The warpgroup prefill (wgmma, Hopper) against the mma.sync prefill, bit for bit, in fast
// precision (exact keeps mma.sync): head dims 128 and 80 (padding columns), groups of 8 and 3,
// rows at depth 300-369 over chunks of 128 keys (3 chunks, folded in shared memory) beside rows
// from the start and a decode row; 2 and 3 K/V stages, and split into windows of 2 chunks. Each run
// is also held to the oracle's bound. Skipped where the GPU or the build has no warpgroup products;
// the emulator has them.
TEST(CudaAttention, WarpgroupPrefillGivesTheMmaBits) {
  M1_REQUIRE_CUDA();
  if (!warpgroup_mma_available(test::test_device().index())) GTEST_SKIP() << "no sm_90a warpgroup products here";
  DeviceScratch scratch(nullptr);
  const Device one_sm = test::device_with_sms(1);
  Device mma = one_sm.with_warpgroup_mma(false), warpgroup = one_sm.with_warpgroup_mma(true);
  constexpr int64_t kChunk = 128;
  for (const Shape& s : {Shape{8, 1, 128, 64}, Shape{6, 2, 80, 80}}) {
    const AttentionSegment rows[] = {{.count = 70, .pos0 = 300}, {.row = 70, .count = 19}, {.row = 89, .count = 1, .pos0 = 200}};
    const PrefillChoices chunked{.chunk_keys = kChunk};
    ASSERT_TRUE(plan_prefill(rows, s.heads, s.kv_heads, s.d, true, warpgroup.limits(), chunked).warpgroup);
    ASSERT_FALSE(plan_prefill(rows, s.heads, s.kv_heads, s.d, true, mma.limits(), chunked).warpgroup);
    ASSERT_FALSE(plan_prefill(rows, s.heads, s.kv_heads, s.d, false, warpgroup.limits(), chunked).warpgroup);
    DeepStep step(s, 300, 200);
    const PrefillChoices forms[] = {{.kv_stages = 3, .chunk_keys = kChunk, .split = -1},
                                    {.kv_stages = 2, .chunk_keys = kChunk, .split = -1},
                                    {.chunk_keys = kChunk, .split = 2}};
    for (const PrefillChoices& form : forms) {
      SCOPED_TRACE(fmt::format("d {}, {} stages, split {}", s.d, form.kv_stages, form.split));
      const std::vector<EntryResult> want = step.run(scratch, true, &mma, form),
                                     got = step.run(scratch, true, &warpgroup, form);
      for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(same_bits(want[i].out, got[i].out)) << "segment " << i;
    }
  }
}

// A prompt's rows at depth get the same bits whether one step or two prefill them: the chunks sit
// at absolute positions. 70 rows after 500 keys, whole or as 30 + 40, chunks of 128 keys, split as
// planned for 132 SMs and folded in registers on one.
TEST(CudaAttention, SplitPrefillRowsDoNotDependOnTheirStep) {
  M1_REQUIRE_CUDA();
  DeviceScratch scratch(nullptr);
  Device one_sm = test::device_with_sms(1), many_sms = test::device_with_sms(132);
  const Shape s{8, 1, 128, 64};
  const uint64_t seed = rng()();
  Cache unused(s.kv_width(), 1);
  const Entry rows = make_entry(s, unused, 70);
  const auto slice = [&](int64_t first, int64_t count) {
    Entry e{nullptr, count, {}, {}, {}};
    e.q.assign(rows.q.begin() + first * s.q_width(), rows.q.begin() + (first + count) * s.q_width());
    e.k.assign(rows.k.begin() + first * s.kv_width(), rows.k.begin() + (first + count) * s.kv_width());
    e.v.assign(rows.v.begin() + first * s.kv_width(), rows.v.begin() + (first + count) * s.kv_width());
    return e;
  };
  for (bool fast : {false, true})
    for (Device* device : {&one_sm, &many_sms}) {
      SCOPED_TRACE(fmt::format("{}, {}", fast ? "fast" : "exact", device == &one_sm ? "in registers" : "split"));
      const StepOptions options{.fast = fast, .device = device, .prefill = {.chunk_keys = 128}};
      Cache whole_cache(s.kv_width(), 600), pieces_cache(s.kv_width(), 600);
      whole_cache.fill_prefix(500, seed);
      pieces_cache.fill_prefix(500, seed);
      Entry whole = rows;
      whole.cache = &whole_cache;
      const std::vector<float> at_once = run_step(s, {whole}, scratch, options)[0].out;
      Entry head = slice(0, 30), tail = slice(30, 40);
      head.cache = tail.cache = &pieces_cache;
      std::vector<float> in_pieces = run_step(s, {head}, scratch, options)[0].out;
      const std::vector<float> rest = run_step(s, {tail}, scratch, options)[0].out;
      in_pieces.insert(in_pieces.end(), rest.begin(), rest.end());
      EXPECT_TRUE(same_bits(at_once, in_pieces));
    }
}

// Needs no GPU. One rank's 512-token step under 8-way tensor parallelism (8 query heads, 1 kv head)
// at depth 32K: 32 wide fast CTAs on 132 SMs, so its 9 chunks of 4,096 keys split, all in one
// launch (288 CTAs); 64 exact CTAs take windows of 5 (2 launches). From the start (one chunk), or
// with the whole model's 8 kv heads (256 CTAs), or where the scratch budget holds fewer than two
// chunks' states, nothing splits. Head dims past 128 keep one chunk.
TEST(CudaAttention, PrefillPlanSplitsDeepRowsOnIdleSms) {
  const DeviceLimits h100{132, 227 * 1024};
  // (warps, CTAs per kv head, most chunks of a row, chunks per split launch)
  const auto cut = [](const PrefillPlan& p) { return std::tuple(p.warps, p.ctas, p.chunks, p.window); };
  const AttentionSegment deep[] = {{.count = 512, .pos0 = 32768}};
  PrefillPlan plan = plan_prefill(deep, 8, 1, 128, true, h100);
  EXPECT_EQ(cut(plan), std::tuple(8, 32, 9, 9));
  EXPECT_EQ(plan.chunk_keys, kPrefillChunkKeys);
  EXPECT_EQ(plan.stages, 3);
  EXPECT_EQ(cut(plan_prefill(deep, 8, 1, 128, false, h100)), std::tuple(4, 64, 9, 5));
  EXPECT_EQ(cut(plan_prefill(deep, 8, 1, 128, true, h100, {.split = -1})), std::tuple(2, 128, 9, 0));  // narrow
  EXPECT_EQ(cut(plan_prefill(deep, 8, 1, 128, true, h100, {.split = 4})), std::tuple(8, 32, 9, 4));
  const AttentionSegment fresh[] = {{.count = 512}};
  EXPECT_EQ(cut(plan_prefill(fresh, 8, 1, 128, true, h100)), std::tuple(2, 128, 1, 0));
  EXPECT_EQ(cut(plan_prefill(deep, 64, 8, 128, true, h100)), std::tuple(8, 32, 9, 0));
  // One chunk's states of 32 CTAs of 128 query vectors at d = 128: 2,129,920 bytes.
  const DeviceLimits room_for_two{132, 227 * 1024, 3 * 2129920}, room_for_one{132, 227 * 1024, 3 * 2129920 - 1};
  EXPECT_EQ(cut(plan_prefill(deep, 8, 1, 128, true, room_for_two)), std::tuple(8, 32, 9, 2));
  EXPECT_EQ(cut(plan_prefill(deep, 8, 1, 128, true, room_for_one)), std::tuple(2, 128, 9, 0));
  EXPECT_EQ(cut(plan_prefill(deep, 8, 1, 256, true, h100)), std::tuple(2, 128, 1, 0));
  testing::expect_error([&] { plan_prefill(deep, 8, 1, 256, true, h100, {.split = 2}); }, {"split prefill", "head dim", "256"});
  testing::expect_error([&] { plan_prefill(deep, 8, 1, 128, true, h100, {.chunk_keys = 100}); }, {"chunks of 100 keys", "multiple of 64"});
  testing::expect_error([&] { plan_prefill(deep, 8, 1, 128, true, h100, {.split = -2}); }, {"split of -2 chunks"});
}

// Needs no GPU: the plan is made on the host. Narrow CTAs when the wide ones would leave SMs idle;
// a third stage only for wide fast CTAs, and only where the GPU's shared memory per block holds it.
TEST(CudaAttention, PrefillPlanNarrowsAndStagesWhereItPays) {
  const DeviceLimits h100{132, 227 * 1024}, one{1, 227 * 1024}, a100_like{108, 160 * 1024};
  const AttentionSegment prompt[] = {{.count = 150}, {.count = 1}, {.count = 33}};
  // 8 query heads on 1 kv head: 1,464 query vectors of prefill (the decode row takes none).
  PrefillPlan plan = plan_prefill(prompt, 8, 1, 128, true, h100);
  EXPECT_EQ(plan.warps, 2);
  EXPECT_EQ(plan.stages, 2);
  EXPECT_EQ(plan.ctas, 38 + 9);
  plan = plan_prefill(prompt, 8, 1, 128, true, one);
  EXPECT_EQ(plan.warps, 8);
  EXPECT_EQ(plan.stages, 3);
  EXPECT_EQ(plan.ctas, 10 + 3);
  plan = plan_prefill(prompt, 8, 1, 128, false, one);
  EXPECT_EQ(plan.warps, 4);
  EXPECT_EQ(plan.stages, 2);
  EXPECT_EQ(plan_prefill(prompt, 8, 1, 128, false, one, {.kv_stages = 3}).stages, 3);
  // 64 query heads on 8 kv heads, 512 rows: 32 wide CTAs per kv head, 256 in all, fill 132 SMs.
  const AttentionSegment chunk[] = {{.count = 512}};
  plan = plan_prefill(chunk, 64, 8, 128, true, h100);
  EXPECT_EQ(plan.warps, 8);
  EXPECT_EQ(plan.ctas, 32);
  EXPECT_EQ(plan.stages, 3);
  // d = 256: 3 stages take 165 KB, past a 160 KB GPU: 2, and forcing 3 there fails.
  EXPECT_EQ(plan_prefill(chunk, 64, 8, 256, true, a100_like).stages, 2);
  EXPECT_EQ(plan_prefill(chunk, 64, 8, 256, true, h100).stages, 3);
  testing::expect_error([&] { plan_prefill(chunk, 64, 8, 256, true, a100_like, {.kv_stages = 3}); }, {"3 K/V stages", "shared memory"});
  testing::expect_error([&] { plan_prefill(chunk, 64, 8, 128, true, h100, {.kv_stages = 4}); }, {"4 K/V stages"});
  const AttentionSegment decode[] = {{.count = 1}, {.count = 1}};
  EXPECT_EQ(plan_prefill(decode, 64, 8, 128, true, h100).ctas, 0);
}

TEST(CudaAttention, DecodeLaunchSizedByCapacity) {
  M1_REQUIRE_CUDA();
  DeviceScratch plain_scratch(nullptr), sized_scratch(nullptr);
  // Room for 20,001 keys: 64 launch slots (the most any length up to it needs, at 16,384 keys),
  // of which a 5,000-key row uses 20; the results must be those of a launch sized by length. With
  // the second row (1 slot by length, 2 by its room of 300) the launch has 66 slots, not 21, and
  // its split partials take about 3 times the scratch.
  const Shape s{16, 2, 128, 64};
  const uint64_t seed_a = rng()(), seed_b = rng()();
  Cache sized_a(s.kv_width(), 20001), sized_b(s.kv_width(), 300), plain_a(s.kv_width(), 20001), plain_b(s.kv_width(), 300);
  sized_a.fill_prefix(4999, seed_a);
  plain_a.fill_prefix(4999, seed_a);
  sized_b.fill_prefix(100, seed_b);
  plain_b.fill_prefix(100, seed_b);
  Entry a = make_entry(s, plain_a, 1), b = make_entry(s, plain_b, 1);
  const std::vector<EntryResult> plain = run_step(s, {a, b}, plain_scratch);
  a.cache = &sized_a;
  b.cache = &sized_b;
  const std::vector<EntryResult> sized = run_step(s, {a, b}, sized_scratch, {.declare_capacity = true});
  for (size_t i = 0; i < 2; ++i)
    EXPECT_EQ(std::memcmp(plain[i].out.data(), sized[i].out.data(), plain[i].out.size() * sizeof(float)), 0)
        << "segment " << i;
  EXPECT_GT(sized_scratch.capacity(), 5 * plain_scratch.capacity() / 2) << "the launch did not grow with the room";
}

// Needs no GPU: the shapes are rejected before anything is launched.
TEST(CudaAttention, RejectsUnsupportedShapes) {
  DeviceScratch scratch(nullptr);
  AttentionArgs args;
  args.heads = 8;
  args.kv_heads = 3;
  args.d = 64;
  args.rotary_dim = 64;
  testing::expect_error([&] { softmax_attention(args, scratch, test::test_device(), nullptr); }, {"kv heads"});
  args.kv_heads = 2;
  args.d = 60;
  args.rotary_dim = 60;
  testing::expect_error([&] { softmax_attention(args, scratch, test::test_device(), nullptr); }, {"head dim 60"});
  args.d = 64;
  args.rotary_dim = 65;
  testing::expect_error([&] { softmax_attention(args, scratch, test::test_device(), nullptr); }, {"rotary dim 65"});
}

}  // namespace
}  // namespace m1::cuda
