// Fuzzes reading compressed-tensors packed weights (read_packed_weight): a safetensors file, as
// fuzz_safetensors_file gets it, read as the packed weight "w" of a [rows, cols] matrix under each
// scheme m1 implements (the first two bytes of the input choose rows and cols). A weight it accepts
// lies in the file: every code and scale is read, and is a finite value times a code in range.

#include <cmath>
#include <vector>

#include "fuzz_support.h"
#include "m1/compressed_tensors.h"
#include "m1/quantize.h"

namespace {

const m1::fuzz::ScratchDir scratch;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const int64_t rows = 1 + data[0] % 16, cols = 1 + data[1];
  const auto file = scratch.write("model.safetensors", m1::fuzz::as_text(data + 2, size - 2));
  m1::fuzz::m1_error_of([&] {
    const m1::Checkpoint checkpoint = m1::Checkpoint::open_file(file);
    for (const auto& [bits, group] : {std::pair{4, int64_t(32)}, {4, int64_t(128)}, {8, int64_t(0)}, {8, int64_t(64)}}) {
      const m1::QuantizationGroup scheme{"group_0", {"Linear"}, bits, group, nullptr};
      m1::fuzz::m1_error_of([&] {
        const m1::Weight w = m1::read_packed_weight(checkpoint, "w", rows, cols, scheme);
        m1::fuzz::check(w.rows == rows && w.cols == cols && w.quantized(), "the weight has the shape asked for");
        std::vector<float> row(static_cast<size_t>(cols));
        for (int64_t r = 0; r < rows; ++r) {
          m1::dequantize_row(w, r, row.data());
          for (int64_t c = 0; c < cols; ++c) {
            const int code = m1::packed_code(m1::packed_row(w, r), w.dtype, c);
            m1::fuzz::check(code >= m1::quant_min(w.dtype) && code <= m1::quant_max(w.dtype), "codes lie in their range");
            const float want = float(code) * m1::scale_at(w, r, c / w.group_size), got = row[size_t(c)];
            m1::fuzz::check(std::isnan(want) ? std::isnan(got) : got == want, "a value is its code times its scale");
          }
        }
      });
    }
  });
  return 0;
}
