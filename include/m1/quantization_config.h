#pragma once
// The quantization_config of a compressed-tensors checkpoint (config.json), as llm-compressor writes
// it and vLLM reads it, limited to the schemes m1 implements: format "pack-quantized", symmetric
// int weights of 4 or 8 bits, one scale per output row ("channel") or per group of inputs ("group",
// a multiple of 32), activations unquantized. Anything else is refused with a one-line error that
// names the field. Which weights are packed is read from the checkpoint (X.weight_packed in place of
// X.weight); the config says how (config_groups and their targets).

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace m1 {

class ModuleMatcher;

struct QuantizationGroup {
  std::string name;                  // its key in config_groups
  std::vector<std::string> targets;  // "Linear" (every linear layer), "re:REGEX" (module names), or a module name
  int num_bits = 4;                  // 4 or 8
  int64_t group_size = 0;            // inputs per scale; 0: one scale per output row (strategy "channel")
  std::shared_ptr<const ModuleMatcher> matcher;
};

struct QuantizationConfig {
  std::vector<QuantizationGroup> groups;
  std::vector<std::string> ignore;  // modules left unquantized (names or "re:REGEX")
};

// `source` names the file in errors, which name the field: "config.json:
// quantization_config.config_groups.group_0.weights.num_bits: 3 is not implemented (...)".
QuantizationConfig parse_quantization_config(const nlohmann::json& json, const std::string& source);

// The config in canonical form (what m1-quantize writes; fields m1 does not read are left out).
nlohmann::ordered_json quantization_config_to_json(const QuantizationConfig& config);

// The group whose targets name `module` (a tensor name without ".weight"): an exact name first, then
// a regular expression (matched from the start of the name, as Python's re.match), then "Linear";
// among equals, the first group. nullptr if none does. Throws m1::Error if a regex is too costly.
const QuantizationGroup* find_group(const QuantizationConfig& config, const std::string& module);

// What m1-quantize writes: one group targeting "Linear", `num_bits` and `group_size` (0: channel),
// with the linear modules left unquantized in `ignore`.
QuantizationConfig make_quantization_config(int num_bits, int64_t group_size, const std::vector<std::string>& ignore);

}  // namespace m1
