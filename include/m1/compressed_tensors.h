#pragma once
// The tensors of a compressed-tensors "pack-quantized" weight: MODULE.weight_packed (I32 [rows,
// ceil(cols * bits / 32)], the codes packed as m1/quantize.h describes), MODULE.weight_scale
// ([rows, groups], BF16, F16 or F32) and MODULE.weight_shape (I64 or I32 [2]: rows, cols). Read
// in place as a quantized Weight, and written by m1-quantize.

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "m1/backend.h"
#include "m1/quantization_config.h"
#include "m1/safetensors.h"

namespace m1 {

std::string packed_tensor_name(const std::string& module);  // MODULE.weight_packed
std::string scale_tensor_name(const std::string& module);   // MODULE.weight_scale
std::string shape_tensor_name(const std::string& module);   // MODULE.weight_shape

// The [rows, cols] weight `module` packed in `checkpoint` with `group`'s scheme, pointing into the
// checkpoint. Throws m1::Error naming the tensor (and both shapes, when a shape is wrong) if a
// tensor is missing or of the wrong dtype or shape, or if the module has zero points or g_idx.
Weight read_packed_weight(const Checkpoint& checkpoint, const std::string& module, int64_t rows, int64_t cols,
                          const QuantizationGroup& group);

// The three tensors of a quantized weight (packed codes, scales, shape): names, dtypes, shapes.
std::vector<TensorSpec> packed_tensor_specs(const std::string& module, const Weight& quantized);

}  // namespace m1
