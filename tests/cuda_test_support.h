#pragma once
// CUDA tests run on a machine with a GPU and skip, saying why, everywhere else. Their device
// memory lives in m1::cuda::DeviceArray (kernels/device_array.h).

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "cuda_check.h"
#include "device.h"
#include "device_array.h"
#include "device_scratch.h"
#include "elementwise.h"
#include "matmul.h"

namespace m1::test {

using cuda::DeviceArray;

// Empty when a CUDA device is usable, else the reason it is not.
inline std::string cuda_unavailable_reason() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) return std::string("no CUDA device: ") + cudaGetErrorString(status);
  if (count == 0) return "no CUDA device";
  return {};
}

// The current GPU as the kernel launchers take it (its limits and shared-memory opt-ins), for
// tests that call them directly; without a GPU, a stand-in for the tests of what launchers refuse
// before they launch.
inline cuda::Device& test_device() {
  static cuda::Device device =
      cuda_unavailable_reason().empty() ? cuda::Device::current() : cuda::Device(0, cuda::DeviceLimits{});
  return device;
}

// What `calls` launches on `stream`, captured once as a CUDA graph, replayed by launch().
class CapturedGraph {
 public:
  template <class Calls>
  CapturedGraph(cudaStream_t stream, Calls calls) : stream_(stream) {
    cudaGraph_t graph = nullptr;
    M1_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
    calls();
    M1_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    const cudaError_t status = cudaGraphInstantiate(&exec_, graph, 0);
    cudaGraphDestroy(graph);
    M1_CUDA_CHECK(status);
  }
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;
  ~CapturedGraph() {
    cudaStreamSynchronize(stream_);
    cudaGraphExecDestroy(exec_);
  }
  void launch() { M1_CUDA_CHECK(cudaGraphLaunch(exec_, stream_)); }

 private:
  cudaStream_t stream_;
  cudaGraphExec_t exec_ = nullptr;
};

// grouped_matmul of w[0], then grouped_matmuls of w[0] and w[1] in one call (one set of partials),
// each into rows x ldo floats filled with `fill`: every output bit-identical to want[0] / want[1]
// (rows outside the groups keep the fill there too).
inline void expect_grouped_bits(const float* x, int64_t ldx, const int64_t* offsets,
                                const std::vector<cuda::DeviceMatrix> (&w)[2], int64_t rows, int64_t bound,
                                int64_t ldo, float fill, cuda::GemmOperands operands, cuda::DeviceScratch& scratch,
                                cuda::Device& device, const std::vector<float> (&want)[2], const std::string& what) {
  const auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  DeviceArray<float> one(std::vector<float>(size_t(rows * ldo), fill));
  cuda::grouped_matmul(x, ldx, offsets, w[0], rows, bound, one.get(), ldo, operands, scratch, device, nullptr);
  EXPECT_TRUE(same(one.download(), want[0])) << what << ", grouped_matmul";
  DeviceArray<float> first(std::vector<float>(size_t(rows * ldo), fill));
  DeviceArray<float> second(std::vector<float>(size_t(rows * ldo), fill));
  const cuda::GroupedProduct products[] = {{w[0], first.get(), ldo}, {w[1], second.get(), ldo}};
  cuda::grouped_matmuls(x, ldx, offsets, products, rows, bound, operands, scratch, device, nullptr);
  EXPECT_TRUE(same(first.download(), want[0])) << what << ", grouped_matmuls, first of two";
  EXPECT_TRUE(same(second.download(), want[1])) << what << ", grouped_matmuls, second of two";
}

// grouped_matmul_swiglu(gate, up, ...) against swiglu then grouped_matmul on copies of the same
// rows, bit for bit, outputs filled with `fill` first (rows outside the groups keep it). gate and
// up: rows x ldx values on the host. `fused`: whether the call should apply SwiGLU as it stages
// the rows (gate left as it was) rather than in a pass of its own (gate overwritten).
inline void expect_swiglu_product_bits(const std::vector<float>& gate, const std::vector<float>& up, int64_t ldx,
                                       const int64_t* offsets, const std::vector<cuda::DeviceMatrix>& w, int64_t rows,
                                       int64_t bound, int64_t ldo, float fill, cuda::GemmOperands operands,
                                       cuda::DeviceScratch& scratch, cuda::Device& device, bool fused,
                                       const std::string& what) {
  const size_t outputs = size_t(rows * ldo);
  DeviceArray<float> g1(gate), u1(up), out1(std::vector<float>(outputs, fill));
  cuda::swiglu(g1.get(), u1.get(), rows * ldx, nullptr);
  cuda::grouped_matmul(g1.get(), ldx, offsets, w, rows, bound, out1.get(), ldo, operands, scratch, device, nullptr);
  DeviceArray<float> g2(gate), u2(up), out2(std::vector<float>(outputs, fill));
  cuda::grouped_matmul_swiglu(g2.get(), u2.get(), ldx, offsets, w, rows, bound, out2.get(), ldo, operands, scratch,
                              device, nullptr);
  const std::vector<float> want = out1.download(), got = out2.download();
  EXPECT_EQ(std::memcmp(got.data(), want.data(), outputs * sizeof(float)), 0) << what;
  const std::vector<float> gate_after = g2.download(), swiglu_gate = g1.download();
  const std::vector<float>& expected_gate = fused ? gate : swiglu_gate;
  EXPECT_EQ(std::memcmp(gate_after.data(), expected_gate.data(), gate.size() * sizeof(float)), 0)
      << what << (fused ? ": SwiGLU applied in a pass of its own" : ": gate not overwritten");
}

// matmuls of x's m rows (row stride ldx) by `weights` against matmul of each alone, bit for bit,
// each output with a row stride past its width (the padding must keep its fill).
inline void expect_matmuls_bits(const float* x, int64_t ldx, int64_t m, const std::vector<cuda::DeviceMatrix>& weights,
                                cuda::GemmOperands operands, cuda::DeviceScratch& scratch, cuda::Device& device,
                                const std::string& what) {
  std::vector<DeviceArray<float>> outs, alone;
  std::vector<cuda::PlainProduct> products;
  for (const cuda::DeviceMatrix& w : weights) {
    const int64_t ldo = w.rows + 5;
    outs.emplace_back(std::vector<float>(size_t(m * ldo), -3.5f));
    alone.emplace_back(std::vector<float>(size_t(m * ldo), -3.5f));
    products.push_back({w, outs.back().get(), ldo});
  }
  cuda::matmuls(x, ldx, m, products, operands, scratch, device, nullptr);
  for (size_t i = 0; i < weights.size(); ++i) {
    cuda::matmul(x, ldx, m, weights[i], alone[i].get(), products[i].ldo, operands, scratch, device, nullptr);
    const std::vector<float> got = outs[i].download(), want = alone[i].download();
    ASSERT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0) << what << ", product " << i;
  }
}

// grouped_matmuls_of_rows (x's rows that x_rows names, read in place when streamed) against the
// rows gathered on the host and grouped_matmuls, bit for bit, for both products of `w` (outputs
// [rows, ldo] filled with `fill` first: rows outside the groups keep it).
inline void expect_rows_read_in_place(const std::vector<float>& x, int64_t ldx, const std::vector<int64_t>& x_rows,
                                      const int64_t* offsets, const std::vector<cuda::DeviceMatrix> (&w)[2],
                                      int64_t bound, int64_t ldo, float fill, cuda::GemmOperands operands,
                                      cuda::DeviceScratch& scratch, cuda::Device& device, const std::string& what) {
  const int64_t rows = int64_t(x_rows.size());
  std::vector<float> gathered_host(size_t(rows * ldx));
  for (int64_t r = 0; r < rows; ++r)
    std::copy_n(x.begin() + x_rows[size_t(r)] * ldx, ldx, gathered_host.begin() + r * ldx);
  const DeviceArray<float> dx(x), gathered(gathered_host);
  const DeviceArray<int64_t> drows(x_rows);
  DeviceArray<float> buffer(size_t(rows * ldx));
  DeviceArray<float> want[2] = {DeviceArray<float>(std::vector<float>(size_t(rows * ldo), fill)),
                                DeviceArray<float>(std::vector<float>(size_t(rows * ldo), fill))};
  DeviceArray<float> got[2] = {DeviceArray<float>(std::vector<float>(size_t(rows * ldo), fill)),
                               DeviceArray<float>(std::vector<float>(size_t(rows * ldo), fill))};
  const cuda::GroupedProduct expected[] = {{w[0], want[0].get(), ldo}, {w[1], want[1].get(), ldo}};
  cuda::grouped_matmuls(gathered.get(), ldx, offsets, expected, rows, bound, operands, scratch, device, nullptr);
  const cuda::GroupedProduct products[] = {{w[0], got[0].get(), ldo}, {w[1], got[1].get(), ldo}};
  cuda::grouped_matmuls_of_rows(dx.get(), ldx, drows.get(), buffer.get(), offsets, products, rows, bound, operands,
                                scratch, device, nullptr);
  for (int p = 0; p < 2; ++p) {
    const std::vector<float> a = got[p].download(), b = want[p].download();
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << what << ", product " << p;
  }
}

// The streamed grouped products' tests (BF16 and quantized): group sizes with empty groups, groups
// of 1 to 20 rows, and 70 groups (two launches) of which only the last has a row.
inline std::vector<std::vector<int64_t>> streamed_group_counts() {
  std::vector<int64_t> many(70);
  many.back() = 1;
  return {{1}, {0, 3, 0, 2}, {8, 0, 1, 5, 7, 2, 0, 4}, {20, 0, 9}, many};
}

// The test GPU seen as having `sms` SMs: the streamed kernels' grids, and so how they split the
// work, follow it. `partial_bytes`: its budget for a product's chunk partials, past which products
// take other kernels (or, streamed, run one at a time).
inline cuda::Device device_with_sms(int sms, size_t partial_bytes = cuda::kDefaultPartialBytes) {
  cuda::DeviceLimits limits = test_device().limits();
  limits.sms = sms;
  limits.partial_bytes = partial_bytes;
  return cuda::Device(test_device().index(), limits);
}

// The bytes of chunk partials a skinny product of `rows` rows makes over a [n, k] weight.
inline size_t partial_bytes(int64_t rows, int64_t n, int64_t k) {
  return size_t((k + cuda::kMatmulChunk - 1) / cuda::kMatmulChunk) * size_t(rows) * size_t(n) * sizeof(float);
}

}  // namespace m1::test

#define M1_REQUIRE_CUDA()                                                     \
  do {                                                                        \
    if (std::string why = ::m1::test::cuda_unavailable_reason(); !why.empty()) \
      GTEST_SKIP() << why;                                                    \
  } while (0)
