#include "cpu/quantized_matmul.h"

#include <algorithm>
#include <vector>

#include "cpu/matmul.h"
#include "m1/quantize.h"

namespace m1::cpu {
namespace {

constexpr int64_t kBlockRows = 64;       // x rows per prefill task
constexpr int64_t kSkinnyRows = 4;       // up to this many x rows, weight rows stream once each
constexpr int64_t kSkinnyOutputs = 256;  // weight rows per task of a skinny product
// Weight rows per prefill task: the dequantized block (rows x k floats) should stay within L2.
int64_t block_outputs(int64_t k) { return std::clamp<int64_t>((256 << 10) / (k * 4) / 4 * 4, 4, 64); }

// Weight rows [j0, j1) as the dense tiles read them: fp32 code * scale, or for bf16 operands the
// codes (one scale per row) or code * scale rounded to bf16.
void dequantize_f32(const Weight& w, int64_t j0, int64_t j1, float* out) {
  for (int64_t j = j0; j < j1; ++j) dequantize_row(w, j, out + (j - j0) * w.cols);
}

void dequantize_bf16(const Weight& w, int64_t j0, int64_t j1, uint16_t* out) {
  const bool codes_only = w.groups() == 1;
  for (int64_t j = j0; j < j1; ++j) {
    const void* row = packed_row(w, j);
    uint16_t* o = out + (j - j0) * w.cols;
    for (int64_t c = 0; c < w.cols; ++c)
      o[c] = f32_to_bf16(codes_only ? float(packed_code(row, w.dtype, c)) : weight_value(w, j, c));
  }
}

// x rows [i0, i1) against weight rows [j0, j1), through a dequantized block.
void block_product(const void* x, const Weight& w, Mat out, bool bf16, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  const int64_t k = w.cols, n = j1 - j0, m = i1 - i0;
  float* o = out.data + i0 * out.cols + j0;
  if (bf16) {
    thread_local std::vector<uint16_t> block;
    block.resize(size_t(n * k));
    dequantize_bf16(w, j0, j1, block.data());
    gemm_nt_bf16(static_cast<const uint16_t*>(x) + i0 * k, k, block.data(), k, m, n, k, o, out.cols);
    if (w.groups() == 1)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) o[i * out.cols + j] *= scale_at(w, j0 + j, 0);
  } else {
    thread_local std::vector<float> block;
    block.resize(size_t(n * k));
    dequantize_f32(w, j0, j1, block.data());
    gemm_nt(static_cast<const float*>(x) + i0 * k, k, block.data(), k, m, n, k, o, out.cols);
  }
}

}  // namespace

int64_t quantized_tasks(int64_t rows, const Weight& w) {
  if (rows <= kSkinnyRows) return (w.rows + kSkinnyOutputs - 1) / kSkinnyOutputs;
  return (rows + kBlockRows - 1) / kBlockRows * ((w.rows + block_outputs(w.cols) - 1) / block_outputs(w.cols));
}

void quantized_task(const void* x, int64_t rows, const Weight& w, Mat out, bool bf16, int64_t task) {
  if (rows <= kSkinnyRows) {
    // Decode: each weight row is dequantized once, in cache, and met by every row of x.
    const int64_t begin = task * kSkinnyOutputs, end = std::min(w.rows, begin + kSkinnyOutputs);
    for (int64_t j = begin; j < end; ++j) block_product(x, w, out, bf16, 0, rows, j, j + 1);
    return;
  }
  const int64_t row_blocks = (rows + kBlockRows - 1) / kBlockRows, outputs = block_outputs(w.cols);
  const int64_t i0 = (task % row_blocks) * kBlockRows, j0 = (task / row_blocks) * outputs;
  block_product(x, w, out, bf16, i0, std::min(rows, i0 + kBlockRows), j0, std::min(w.rows, j0 + outputs));
}

}  // namespace m1::cpu
