// Parsing and validation of config.json.

#include "m1/config.h"

#include <cmath>
#include <fstream>
#include <limits>

#include "json_text.h"
#include "m1/error.h"

namespace m1 {
namespace {

using nlohmann::json;

// Dimensions past this are certainly a corrupt file, and products of two of them stay far from
// overflowing int64.
constexpr int64_t kMaxDimension = int64_t(1) << 24;

class ConfigReader {
 public:
  ConfigReader(const json& j, const std::string& source) : j_(j), source_(source) {}

  [[noreturn]] void bad(const std::string& field, const std::string& why) const {
    fail("{}: {}: {}", source_, field, why);
  }

  bool has(const std::string& field) const { return j_.contains(field) && !j_[field].is_null(); }

  int64_t integer(const std::string& field, int64_t min, int64_t max) const {
    if (!has(field)) bad(field, "missing required field");
    return integer_value(field, min, max);
  }
  int64_t integer_or(const std::string& field, int64_t fallback, int64_t min, int64_t max) const {
    return has(field) ? integer_value(field, min, max) : fallback;
  }

  double number_or(const std::string& field, double fallback, bool positive) const {
    if (!has(field)) return fallback;
    const json& v = j_[field];
    if (!v.is_number()) bad(field, fmt::format("expected a number, got {}", json_brief(v)));
    double d = v.get<double>();
    if (!std::isfinite(d) || (positive && d <= 0)) bad(field, fmt::format("must be {}, got {}", positive ? "a positive number" : "finite", json_brief(v)));
    return d;
  }

  bool boolean_or(const std::string& field, bool fallback) const {
    if (!has(field)) return fallback;
    if (!j_[field].is_boolean()) bad(field, fmt::format("expected true or false, got {}", json_brief(j_[field])));
    return j_[field].get<bool>();
  }

  std::string string_or(const std::string& field, const std::string& fallback) const {
    if (!has(field)) return fallback;
    if (!j_[field].is_string()) bad(field, fmt::format("expected a string, got {}", json_brief(j_[field])));
    return j_[field].get<std::string>();
  }

  const json& raw(const std::string& field) const { return j_[field]; }

 private:
  int64_t integer_value(const std::string& field, int64_t min, int64_t max) const {
    const json& v = j_[field];
    if (!v.is_number_integer()) bad(field, fmt::format("expected an integer, got {}", json_brief(v)));
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
      bad(field, fmt::format("must be in [{}, {}], got {}", min, max, json_brief(v)));
    int64_t i = v.get<int64_t>();
    if (i < min || i > max) bad(field, fmt::format("must be in [{}, {}], got {}", min, max, i));
    return i;
  }

  const json& j_;
  const std::string& source_;
};

std::string read_architecture(const ConfigReader& r) {
  static const char* kKnown[] = {"MiniMaxM1ForCausalLM", "MiniMaxText01ForCausalLM"};
  if (!r.has("architectures")) r.bad("architectures", "missing required field");
  const json& list = r.raw("architectures");
  if (!list.is_array() || list.size() != 1 || !list[0].is_string())
    r.bad("architectures", fmt::format("expected a list of one name, got {}", json_brief(list)));
  std::string name = list[0].get<std::string>();
  for (const char* known : kKnown)
    if (name == known) return name;
  r.bad("architectures", fmt::format("unsupported architecture {} (m1 runs MiniMaxM1ForCausalLM and "
                                     "MiniMaxText01ForCausalLM)", quote_name(name)));
}

std::vector<int> read_attn_types(const ConfigReader& r, int64_t layers) {
  if (!r.has("attn_type_list")) r.bad("attn_type_list", "missing required field");
  const json& list = r.raw("attn_type_list");
  if (!list.is_array()) r.bad("attn_type_list", fmt::format("expected a list of 0/1, got {}", json_brief(list)));
  if (int64_t(list.size()) != layers)
    r.bad("attn_type_list", fmt::format("has {} entries but num_hidden_layers is {}", list.size(), layers));
  std::vector<int> types;
  for (size_t i = 0; i < list.size(); ++i) {
    if (!list[i].is_number_integer() || (list[i].get<int64_t>() != 0 && list[i].get<int64_t>() != 1))
      r.bad(fmt::format("attn_type_list[{}]", i),
            fmt::format("expected 0 (lightning) or 1 (softmax), got {}", json_brief(list[i])));
    types.push_back(list[i].get<int>());
  }
  return types;
}

void read_dimensions(const ConfigReader& r, ModelConfig& c) {
  c.vocab_size = r.integer("vocab_size", 1, kMaxDimension);
  c.hidden_size = r.integer("hidden_size", 1, kMaxDimension);
  c.num_hidden_layers = r.integer("num_hidden_layers", 1, 4096);
  // The lightning decay divides by L - 1.
  if (c.num_hidden_layers < 2) r.bad("num_hidden_layers", fmt::format("must be at least 2, got {}", c.num_hidden_layers));
  c.num_attention_heads = r.integer("num_attention_heads", 1, 65536);
  c.num_key_value_heads = r.integer_or("num_key_value_heads", c.num_attention_heads, 1, 65536);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    r.bad("num_key_value_heads", fmt::format("{} does not divide num_attention_heads {}",
                                             c.num_key_value_heads, c.num_attention_heads));
  if (!r.has("head_dim") && c.hidden_size % c.num_attention_heads != 0)
    r.bad("head_dim", fmt::format("missing, and hidden_size {} is not a multiple of num_attention_heads {}",
                                  c.hidden_size, c.num_attention_heads));
  c.head_dim = r.integer_or("head_dim", c.hidden_size / c.num_attention_heads, 1, 65536);
  if (c.num_attention_heads * c.head_dim > kMaxDimension)
    r.bad("head_dim", fmt::format("num_attention_heads * head_dim = {} is too large", c.num_attention_heads * c.head_dim));
  c.rotary_dim = r.integer_or("rotary_dim", c.head_dim, 2, c.head_dim);
  if (c.rotary_dim % 2 != 0) r.bad("rotary_dim", fmt::format("must be even, got {}", c.rotary_dim));
  c.intermediate_size = r.integer("intermediate_size", 1, kMaxDimension);
  c.num_local_experts = r.integer("num_local_experts", 1, 4096);
  c.num_experts_per_tok = r.integer("num_experts_per_tok", 1, 4096);
  if (c.num_experts_per_tok > c.num_local_experts)
    r.bad("num_experts_per_tok", fmt::format("{} is more than num_local_experts {}", c.num_experts_per_tok,
                                             c.num_local_experts));
  c.shared_intermediate_size = r.integer_or("shared_intermediate_size", 0, 0, kMaxDimension);
  c.max_position_embeddings = r.integer_or("max_position_embeddings", 4096 * 32, 1, std::numeric_limits<int32_t>::max());
}

void read_arithmetic(const ConfigReader& r, ModelConfig& c) {
  std::string act = r.string_or("hidden_act", "silu");
  if (act != "silu") r.bad("hidden_act", fmt::format("unsupported activation {} (only silu)", quote_name(act)));
  if (c.shared_intermediate_size > 0) {
    std::string mode = r.string_or("shared_moe_mode", "sigmoid");
    if (mode != "sigmoid") r.bad("shared_moe_mode", fmt::format("unsupported mode {} (only sigmoid)", quote_name(mode)));
  }
  c.rms_norm_eps = r.number_or("rms_norm_eps", 1e-5, true);
  c.rope_theta = r.number_or("rope_theta", 1e6, true);
  c.postnorm = r.boolean_or("postnorm", false);
  c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);
  c.linear_attention_alpha = r.number_or("layernorm_linear_attention_alpha", 1, false);
  c.linear_attention_beta = r.number_or("layernorm_linear_attention_beta", 1, false);
  c.full_attention_alpha = r.number_or("layernorm_full_attention_alpha", 1, false);
  c.full_attention_beta = r.number_or("layernorm_full_attention_beta", 1, false);
  c.mlp_alpha = r.number_or("layernorm_mlp_alpha", 1, false);
  c.mlp_beta = r.number_or("layernorm_mlp_beta", 1, false);
}

}  // namespace

int64_t ModelConfig::lightning_layers() const {
  int64_t n = 0;
  for (int t : attn_type_list) n += t == 0;
  return n;
}

int64_t ModelConfig::softmax_layers() const { return num_hidden_layers - lightning_layers(); }

int64_t ModelConfig::kind_index(int64_t layer) const {
  int64_t n = 0;
  for (int64_t l = 0; l < layer; ++l) n += attn_type_list[size_t(l)] == attn_type_list[size_t(layer)];
  return n;
}

ModelConfig parse_config(const json& j, const std::string& source) {
  if (!j.is_object()) fail("{}: expected a JSON object", source);
  ConfigReader r(j, source);
  ModelConfig c;
  c.architecture = read_architecture(r);
  read_dimensions(r, c);
  c.attn_type_list = read_attn_types(r, c.num_hidden_layers);
  read_arithmetic(r, c);
  if (j.contains("quantization_config") && !j["quantization_config"].is_null())
    c.quantization = parse_quantization_config(j["quantization_config"], source);
  return c;
}

ModelConfig load_config(const std::filesystem::path& path) {
  std::error_code ec;
  if (std::filesystem::exists(path, ec) && !std::filesystem::is_regular_file(path, ec))
    fail("{}: not a regular file", path.string());
  std::ifstream in(path);
  if (!in) fail("{}: cannot open (does the model directory hold a config.json?)", path.string());
  json j = json::parse(in, nullptr, false);
  if (j.is_discarded()) fail("{}: not valid JSON", path.string());
  return parse_config(j, path.string());
}

nlohmann::ordered_json config_to_json(const ModelConfig& c) {
  nlohmann::ordered_json j;
  j["architectures"] = {c.architecture};
  j["model_type"] = c.architecture == "MiniMaxText01ForCausalLM" ? "minimax_text_01" : "minimax_m1";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["rotary_dim"] = c.rotary_dim;
  j["num_local_experts"] = c.num_local_experts;
  j["num_experts_per_tok"] = c.num_experts_per_tok;
  j["shared_intermediate_size"] = c.shared_intermediate_size;
  j["shared_moe_mode"] = "sigmoid";
  j["attn_type_list"] = c.attn_type_list;
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["postnorm"] = c.postnorm;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["layernorm_linear_attention_alpha"] = c.linear_attention_alpha;
  j["layernorm_linear_attention_beta"] = c.linear_attention_beta;
  j["layernorm_full_attention_alpha"] = c.full_attention_alpha;
  j["layernorm_full_attention_beta"] = c.full_attention_beta;
  j["layernorm_mlp_alpha"] = c.mlp_alpha;
  j["layernorm_mlp_beta"] = c.mlp_beta;
  j["bos_token_id"] = nullptr;
  j["eos_token_id"] = nullptr;
  j["torch_dtype"] = "bfloat16";
  if (c.quantization) j["quantization_config"] = quantization_config_to_json(*c.quantization);
  return j;
}

}  // namespace m1
