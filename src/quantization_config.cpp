// compressed-tensors quantization_config: the schemes m1 implements, every other one refused by
// name, and the targets that say which group a module belongs to.

#include "m1/quantization_config.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "json_text.h"
#include "m1/error.h"

namespace m1 {

using nlohmann::json;

// The targets (or ignore list) of one group, compiled: module names, regular expressions and the
// "Linear" class.
class ModuleMatcher {
 public:
  enum Level { kNone = 0, kLinear = 1, kRegex = 2, kName = 3 };

  ModuleMatcher(const std::vector<std::string>& targets, const std::string& field) {
    for (size_t i = 0; i < targets.size(); ++i) {
      const std::string& t = targets[i];
      if (t == "Linear") {
        linear_ = true;
      } else if (t.rfind("re:", 0) == 0) {
        int error = 0;
        PCRE2_SIZE offset = 0;
        pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(t.data() + 3), t.size() - 3, PCRE2_ANCHORED, &error,
                                         &offset, nullptr);
        if (!code) {
          std::string message(256, '\0');
          message.resize(size_t(std::max(0, pcre2_get_error_message(error, reinterpret_cast<PCRE2_UCHAR*>(message.data()), message.size()))));
          fail("{}[{}]: {} is not a regular expression: {} at offset {}", field, i, quote_name(t), message, offset);
        }
        regexes_.emplace_back(code, pcre2_code_free);
        patterns_.push_back(t);
      } else {
        names_.push_back(t);
      }
    }
  }

  Level match(const std::string& module) const {
    for (const std::string& n : names_)
      if (n == module) return kName;
    for (size_t i = 0; i < regexes_.size(); ++i)
      if (matches(*regexes_[i], patterns_[i], module)) return kRegex;
    return linear_ ? kLinear : kNone;
  }

 private:
  static bool matches(const pcre2_code& code, const std::string& pattern, const std::string& module) {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data(pcre2_match_data_create_from_pattern(&code, nullptr),
                                                                              pcre2_match_data_free);
    std::unique_ptr<pcre2_match_context, decltype(&pcre2_match_context_free)> context(pcre2_match_context_create(nullptr),
                                                                                     pcre2_match_context_free);
    if (!data || !context) throw std::bad_alloc();
    // A target is a short pattern over a short name: bound the work a pathological one may do.
    pcre2_set_match_limit(context.get(), 100000);
    pcre2_set_depth_limit(context.get(), 1000);
    const int rc = pcre2_match(&code, reinterpret_cast<PCRE2_SPTR>(module.data()), module.size(), 0, 0, data.get(), context.get());
    if (rc >= 0) return true;
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    fail("quantization_config: target {} cannot be matched against {} (error {})", quote_name(pattern), quote_name(module), rc);
  }

  std::vector<std::string> names_, patterns_;
  std::vector<std::shared_ptr<pcre2_code>> regexes_;
  bool linear_ = false;
};

namespace {

// Null or absent: a feature the config does not use.
bool unused(const json& object, const char* key) { return !object.contains(key) || object[key].is_null(); }

std::vector<std::string> string_list(const json& value, const std::string& field) {
  if (!value.is_array()) fail("{}: must be a list of strings", field);
  std::vector<std::string> out;
  for (const json& v : value) {
    if (!v.is_string()) fail("{}: must be a list of strings, found {}", field, json_brief(v));
    out.push_back(v.get<std::string>());
  }
  return out;
}

// A field m1 does not implement when it is set: "FIELD: VALUE (WHAT) is not implemented".
void refuse_if_set(const json& object, const char* key, const std::string& prefix, const char* what) {
  if (unused(object, key)) return;
  const json& v = object[key];
  if (v.is_boolean() && !v.get<bool>()) return;  // e.g. "dynamic": false, "actorder": false
  fail("{}{}: {} ({}) is not implemented", prefix, key, json_brief(v), what);
}

void require_string(const json& object, const char* key, const std::string& prefix, const std::string& want,
                    const char* what) {
  if (!object.contains(key)) fail("{}{}: missing (expected \"{}\")", prefix, key, want);
  const json& v = object[key];
  if (!v.is_string() || v.get<std::string>() != want) fail("{}{}: {} is not implemented ({})", prefix, key, json_brief(v), what);
}

QuantizationGroup parse_group(const std::string& name, const json& g, const std::string& prefix) {
  if (!g.is_object()) fail("{}: must be an object", prefix);
  QuantizationGroup group;
  group.name = name;
  if (!g.contains("targets")) fail("{}.targets: missing", prefix);
  group.targets = string_list(g["targets"], prefix + ".targets");
  if (group.targets.empty()) fail("{}.targets: empty (a group must target something)", prefix);
  group.matcher = std::make_shared<const ModuleMatcher>(group.targets, prefix + ".targets");
  const std::string dot = prefix + ".";
  refuse_if_set(g, "input_activations", dot, "activation quantization: m1 quantizes weights only");
  refuse_if_set(g, "output_activations", dot, "activation quantization: m1 quantizes weights only");
  if (g.contains("format") && !g["format"].is_null())
    require_string(g, "format", dot, "pack-quantized", "m1 reads pack-quantized weights");
  if (unused(g, "weights")) fail("{}.weights: missing (a group without weights quantizes nothing m1 reads)", prefix);
  const json& w = g["weights"];
  const std::string wp = prefix + ".weights.";
  if (!w.is_object()) fail("{}.weights: must be an object", prefix);
  require_string(w, "type", wp, "int", "m1 implements int weights, not float (fp8) ones");
  if (!w.contains("num_bits")) fail("{}num_bits: missing", wp);
  const json& bits = w["num_bits"];
  if (!bits.is_number_integer() || (bits.get<int64_t>() != 4 && bits.get<int64_t>() != 8))
    fail("{}num_bits: {} is not implemented (m1 implements 4 and 8)", wp, json_brief(bits));
  group.num_bits = int(bits.get<int64_t>());
  if (w.contains("symmetric") && !(w["symmetric"].is_boolean() && w["symmetric"].get<bool>()))
    fail("{}symmetric: {} (zero points) is not implemented: m1 implements symmetric weights", wp, json_brief(w["symmetric"]));
  refuse_if_set(w, "actorder", wp, "g_idx activation ordering");
  refuse_if_set(w, "dynamic", wp, "dynamic weight quantization");
  refuse_if_set(w, "block_structure", wp, "block scales");
  if (!w.contains("strategy") || !w["strategy"].is_string())
    fail("{}strategy: missing (expected \"channel\" or \"group\")", wp);
  const std::string strategy = w["strategy"].get<std::string>();
  if (strategy == "group") {
    const json& size = w.contains("group_size") ? w["group_size"] : json();
    if (!size.is_number_integer() || size.get<int64_t>() <= 0)
      fail("{}group_size: {} is not a group size (strategy \"group\" needs a positive integer)", wp, json_brief(size));
    if (size.get<int64_t>() % 32 != 0 || size.get<int64_t>() > (int64_t(1) << 30))
      fail("{}group_size: {} is not implemented (m1 implements multiples of 32)", wp, size.get<int64_t>());
    group.group_size = size.get<int64_t>();
  } else if (strategy != "channel") {
    fail("{}strategy: {} is not implemented (m1 implements \"channel\" and \"group\")", wp, json_brief(w["strategy"]));
  }
  return group;
}

}  // namespace

QuantizationConfig parse_quantization_config(const json& q, const std::string& source) {
  const std::string prefix = source + ": quantization_config.";
  if (!q.is_object()) fail("{}: quantization_config must be an object", source);
  QuantizationConfig config;
  require_string(q, "quant_method", prefix, "compressed-tensors", "m1 reads compressed-tensors pack-quantized checkpoints");
  const bool mixed = q.contains("format") && q["format"] == "mixed-precision";
  if (!mixed) require_string(q, "format", prefix, "pack-quantized", "m1 reads pack-quantized weights");
  if (q.contains("quantization_status") && !q["quantization_status"].is_null())
    require_string(q, "quantization_status", prefix, "compressed", "m1 reads compressed checkpoints");
  refuse_if_set(q, "kv_cache_scheme", prefix, "KV cache quantization");
  refuse_if_set(q, "transform_config", prefix, "weight transforms");
  if (!unused(q, "sparsity_config")) {
    const json& s = q["sparsity_config"];
    const bool dense = s.is_object() && (s.empty() || !s.contains("format") || s["format"] == "dense");
    if (!dense) fail("{}sparsity_config: {} (sparse weights) is not implemented", prefix, json_brief(s));
  }
  if (!q.contains("config_groups") || !q["config_groups"].is_object() || q["config_groups"].empty())
    fail("{}config_groups: missing or empty (expected an object of groups)", prefix);
  for (const auto& [name, g] : q["config_groups"].items()) {
    const std::string group_prefix = prefix + "config_groups." + name;
    if (mixed && !(g.is_object() && g.contains("format")))
      fail("{}.format: missing (a mixed-precision config names each group's format)", group_prefix);
    config.groups.push_back(parse_group(name, g, group_prefix));
  }
  if (!unused(q, "ignore")) {
    config.ignore = string_list(q["ignore"], prefix + "ignore");
    ModuleMatcher(config.ignore, prefix + "ignore");  // the regexes compile
  }
  return config;
}

const QuantizationGroup* find_group(const QuantizationConfig& config, const std::string& module) {
  const QuantizationGroup* best = nullptr;
  ModuleMatcher::Level best_level = ModuleMatcher::kNone;
  for (const QuantizationGroup& g : config.groups) {
    const ModuleMatcher::Level level = g.matcher->match(module);
    if (level > best_level) best = &g, best_level = level;
  }
  return best;
}

nlohmann::ordered_json quantization_config_to_json(const QuantizationConfig& config) {
  nlohmann::ordered_json groups = nlohmann::ordered_json::object();
  for (const QuantizationGroup& g : config.groups) {
    const bool grouped = g.group_size > 0;
    nlohmann::ordered_json weights = {{"num_bits", g.num_bits},
                                      {"type", "int"},
                                      {"symmetric", true},
                                      {"strategy", grouped ? "group" : "channel"},
                                      {"group_size", grouped ? nlohmann::ordered_json(g.group_size) : nlohmann::ordered_json()},
                                      {"dynamic", false},
                                      {"actorder", nullptr},
                                      {"block_structure", nullptr}};
    groups[g.name] = {{"targets", g.targets}, {"weights", weights}, {"input_activations", nullptr}, {"output_activations", nullptr}};
  }
  return {{"quant_method", "compressed-tensors"}, {"format", "pack-quantized"}, {"quantization_status", "compressed"},
          {"config_groups", groups},              {"ignore", config.ignore},    {"kv_cache_scheme", nullptr}};
}

QuantizationConfig make_quantization_config(int num_bits, int64_t group_size, const std::vector<std::string>& ignore) {
  QuantizationConfig config;
  config.groups.push_back(QuantizationGroup{"group_0", {"Linear"}, num_bits, group_size, nullptr});
  config.ignore = ignore;
  return parse_quantization_config(json::parse(quantization_config_to_json(config).dump()), "m1-quantize");
}

}  // namespace m1
