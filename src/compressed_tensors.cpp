// compressed-tensors pack-quantized tensors, read in place and written.

#include "m1/compressed_tensors.h"

#include <cstring>

#include <nlohmann/json.hpp>

#include "json_text.h"
#include "m1/error.h"
#include "m1/quantize.h"

namespace m1 {
namespace {

std::string shape_text(const std::vector<int64_t>& shape) { return nlohmann::json(shape).dump(); }

const TensorView& require_tensor(const Checkpoint& checkpoint, const std::string& name, const std::string& module) {
  const TensorView* t = checkpoint.find(name);
  if (!t) fail("checkpoint: tensor {} is missing (module {} is packed: weight_packed, weight_scale)", quote_name(name), quote_name(module));
  return *t;
}

void check_shape(const TensorView& t, const std::vector<int64_t>& want, const std::string& what) {
  if (t.shape != want)
    fail("{}: tensor {} has shape {} but {} needs {}", t.file, quote_name(t.name), shape_text(t.shape), what, shape_text(want));
}

// weight_shape, when present: the unpacked shape, as I64 or I32.
void check_shape_tensor(const TensorView& t, int64_t rows, int64_t cols) {
  if (t.dtype_name != "I64" && t.dtype_name != "I32")
    fail("{}: tensor {} has dtype {} (expected I64 or I32)", t.file, quote_name(t.name), quote_name(t.dtype_name));
  check_shape(t, {2}, "the shape of a matrix");
  int64_t stored[2];
  for (int i = 0; i < 2; ++i) {
    if (t.dtype_name == "I64") {
      std::memcpy(&stored[i], t.data + 8 * i, 8);
    } else {
      int32_t v;
      std::memcpy(&v, t.data + 4 * i, 4);
      stored[i] = v;
    }
  }
  if (stored[0] != rows || stored[1] != cols)
    fail("{}: tensor {} says [{}, {}] but the config needs [{}, {}]", t.file, quote_name(t.name), stored[0], stored[1], rows, cols);
}

}  // namespace

std::string packed_tensor_name(const std::string& module) { return module + ".weight_packed"; }
std::string scale_tensor_name(const std::string& module) { return module + ".weight_scale"; }
std::string shape_tensor_name(const std::string& module) { return module + ".weight_shape"; }

Weight read_packed_weight(const Checkpoint& checkpoint, const std::string& module, int64_t rows, int64_t cols,
                          const QuantizationGroup& group) {
  for (const char* suffix : {".weight_zero_point", ".weight_g_idx"})
    if (const TensorView* t = checkpoint.find(module + suffix))
      fail("{}: tensor {}: {} not implemented (m1 reads symmetric weights in input order)", t->file, quote_name(t->name),
           std::string(suffix) == ".weight_zero_point" ? "zero points (asymmetric weights) are" : "activation ordering (g_idx) is");
  Weight w;
  w.dtype = group.num_bits == 8 ? DType::kQ8 : DType::kQ4;
  w.rows = rows;
  w.cols = cols;
  w.group_size = group.group_size > 0 ? group.group_size : cols;
  const std::string scheme = fmt::format("int{} codes of a [{}, {}] weight (config group {})", group.num_bits, rows, cols,
                                         quote_name(group.name));

  const TensorView& packed = require_tensor(checkpoint, packed_tensor_name(module), module);
  if (packed.dtype_name != "I32")
    fail("{}: tensor {} has dtype {} (compressed-tensors packs codes into I32)", packed.file, quote_name(packed.name),
         quote_name(packed.dtype_name));
  check_shape(packed, {rows, int64_t(w.row_bytes() / 4)}, scheme);
  w.data = packed.data;

  const TensorView& scale = require_tensor(checkpoint, scale_tensor_name(module), module);
  const auto scale_dtype = dtype_from_name(scale.dtype_name);
  if (!scale_dtype || !is_float(*scale_dtype))
    fail("{}: tensor {} has dtype {} (scales must be BF16, F16 or F32)", scale.file, quote_name(scale.name), quote_name(scale.dtype_name));
  w.scale_dtype = *scale_dtype;
  check_shape(scale, {rows, w.groups()}, fmt::format("one scale per {} inputs of a [{}, {}] weight", w.group_size, rows, cols));
  w.scales = scale.data;

  if (const TensorView* shape = checkpoint.find(shape_tensor_name(module))) check_shape_tensor(*shape, rows, cols);
  check_quantized_layout(w, fmt::format("module {}", quote_name(module)));
  return w;
}

std::vector<TensorSpec> packed_tensor_specs(const std::string& module, const Weight& q) {
  return {TensorSpec{packed_tensor_name(module), DType::kI32, {q.rows, int64_t(q.row_bytes() / 4)}},
          TensorSpec{scale_tensor_name(module), q.scale_dtype, {q.rows, q.groups()}},
          TensorSpec{shape_tensor_name(module), DType::kI64, {2}}};
}

}  // namespace m1
