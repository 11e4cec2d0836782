// m1-mkmodel: writes a random MiniMax-M1 checkpoint in the Hugging Face layout (config.json,
// safetensors, tokenizer.json), of any shape, for tests, demos and benchmarks.

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string_view>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "m1/error.h"
#include "m1/safetensors.h"
#include "m1/synthetic.h"
#include "embedded_tokenizer.h"

namespace fs = std::filesystem;
using ordered_json = nlohmann::ordered_json;

namespace {

struct Options {
  std::string preset = "tiny";
  fs::path out;
  int64_t layers = 0;
  std::string attention;
  std::vector<std::string> overrides;
  std::string dtype = "bf16";
  uint64_t seed = 0;
  std::string tokenizer;  // "full", or the number of merges to keep; default: the preset's
  fs::path tokenizer_source;  // empty: the real tokenizer built into this binary
  double shard_mb = 0;
  bool force = false;
};

m1::DType parse_dtype(const std::string& text) {
  const std::optional<m1::DType> dtype = m1::dtype_from_option(text);
  if (!dtype) m1::fail("--dtype: '{}' is not one of bf16, f16, f32", text);
  return *dtype;
}

// A plain (key-sorted) json: an order-keeping parse of the 200k-entry vocabulary is quadratic.
nlohmann::json read_json(const fs::path& path) {
  std::ifstream in(path);
  if (!in) m1::fail("{}: cannot open", path.string());
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded()) m1::fail("{}: not valid JSON", path.string());
  return j;
}

nlohmann::json parse_embedded(std::string_view text, const char* name) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded()) m1::fail("the {} built into m1-mkmodel is not valid JSON (a broken build)", name);
  return j;
}

std::string source_name(const Options& o) {
  return o.tokenizer_source.empty() ? std::string("the built-in tokenizer.json") : o.tokenizer_source.string();
}

template <class Json>
void write_json(const fs::path& path, const Json& j, int indent) {
  std::ofstream out(path);
  out << j.dump(indent) << "\n";
  if (!out.flush()) m1::fail("{}: write failed", path.string());
}

// The real tokenizer cut to its first `merges` merges: ids 0-255 are the bytes, then one id per
// kept merge, then the added tokens renumbered to follow.
nlohmann::json truncated_tokenizer(nlohmann::json tok, int64_t merges, const std::string& source) {
  auto& model = tok["model"];
  if (!model.contains("merges") || !model["merges"].is_array() || int64_t(model["merges"].size()) < merges)
    m1::fail("{}: has fewer than {} merges", source, merges);
  const int64_t kept_ids = 256 + merges;
  nlohmann::json vocab = nlohmann::json::object();
  for (auto& [text, id] : model["vocab"].items())
    if (id.get<int64_t>() < kept_ids) vocab[text] = id;
  model["vocab"] = std::move(vocab);
  model["merges"].erase(model["merges"].begin() + merges, model["merges"].end());
  int64_t first_added = INT64_MAX;
  for (auto& t : tok["added_tokens"]) first_added = std::min(first_added, t["id"].get<int64_t>());
  for (auto& t : tok["added_tokens"]) t["id"] = kept_ids + (t["id"].get<int64_t>() - first_added);
  return tok;
}

// The tokenizer.json to write: the source, or its first `merges` merges.
nlohmann::json model_tokenizer(const Options& o, int64_t merges) {
  nlohmann::json tok = o.tokenizer_source.empty() ? parse_embedded(m1::tools::embedded_tokenizer_json(), "tokenizer.json")
                                                  : read_json(o.tokenizer_source);
  if (merges >= 0) tok = truncated_tokenizer(std::move(tok), merges, source_name(o));
  return tok;
}

// The tokenizer_config.json (chat template) to write: the built-in one, or the one beside
// --tokenizer-source when there is one.
std::optional<nlohmann::json> model_tokenizer_config(const Options& o) {
  if (o.tokenizer_source.empty())
    return parse_embedded(m1::tools::embedded_tokenizer_config_json(), "tokenizer_config.json");
  const fs::path beside = o.tokenizer_source.parent_path() / "tokenizer_config.json";
  if (!fs::exists(beside)) return std::nullopt;
  return read_json(beside);
}

int64_t tokenizer_vocab(const nlohmann::json& tok) {
  int64_t vocab = 0;
  for (auto& [text, id] : tok["model"]["vocab"].items()) vocab = std::max(vocab, id.get<int64_t>() + 1);
  for (auto& t : tok["added_tokens"]) vocab = std::max(vocab, t["id"].get<int64_t>() + 1);
  return vocab;
}

int64_t merges_to_keep(const Options& o, const m1::Preset& p) {
  if (o.tokenizer.empty()) return p.tokenizer_merges;
  if (o.tokenizer == "full") return -1;
  try {
    size_t used = 0;
    int64_t n = std::stoll(o.tokenizer, &used);
    if (used == o.tokenizer.size() && n >= 0) return n;
  } catch (const std::exception&) {
  }
  m1::fail("--tokenizer: expected 'full' or a number of merges, got '{}'", o.tokenizer);
}

// The preset's config.json with the command line's changes, validated.
ordered_json build_config(const Options& o, const m1::Preset& p, int64_t vocab, m1::DType dtype) {
  ordered_json j = m1::config_to_json(p.config);
  if (o.layers > 0) {
    j["num_hidden_layers"] = o.layers;
    j["attn_type_list"] = m1::hybrid_attention(o.layers);
  }
  const int64_t layers = j["num_hidden_layers"].get<int64_t>();
  if (o.attention == "lightning" || o.attention == "softmax")
    j["attn_type_list"] = std::vector<int>(size_t(layers), o.attention == "softmax" ? 1 : 0);
  j["vocab_size"] = vocab;
  for (const std::string& kv : o.overrides) {
    size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) m1::fail("--set: expected FIELD=VALUE, got '{}'", kv);
    std::string value = kv.substr(eq + 1);
    ordered_json parsed = ordered_json::parse(value, nullptr, false);
    j[kv.substr(0, eq)] = parsed.is_discarded() ? ordered_json(value) : parsed;
  }
  if (j["vocab_size"].is_number_integer() && j["vocab_size"].get<int64_t>() < vocab)
    m1::fail("--set vocab_size: {} is smaller than the tokenizer's {} ids", j["vocab_size"].dump(), vocab);
  j["torch_dtype"] = dtype == m1::DType::kBF16 ? "bfloat16" : dtype == m1::DType::kF16 ? "float16" : "float32";
  m1::parse_config(nlohmann::json::parse(j.dump()), "config (after the command line's changes)");
  return j;
}

void make_model(const Options& o) {
  const m1::Preset p = m1::preset(o.preset);
  const m1::DType dtype = parse_dtype(o.dtype);
  if (o.shard_mb < 0) m1::fail("--shard-size: must be 0 (one file) or more, got {}", o.shard_mb);
  std::error_code ec;
  if (fs::exists(o.out, ec) && !fs::is_empty(o.out, ec) && !o.force)
    m1::fail("{}: exists and is not empty (use --force to overwrite)", o.out.string());
  // Everything is checked before the first file is written.
  const nlohmann::json tokenizer = model_tokenizer(o, merges_to_keep(o, p));
  const std::optional<nlohmann::json> tokenizer_config = model_tokenizer_config(o);
  const ordered_json config_json = build_config(o, p, tokenizer_vocab(tokenizer), dtype);
  const m1::ModelConfig config = m1::parse_config(nlohmann::json::parse(config_json.dump()), "config");

  fs::create_directories(o.out, ec);
  if (ec) m1::fail("{}: cannot create: {}", o.out.string(), ec.message());
  write_json(o.out / "tokenizer.json", tokenizer, -1);
  if (tokenizer_config) write_json(o.out / "tokenizer_config.json", *tokenizer_config, 2);
  write_json(o.out / "config.json", config_json, 2);

  const std::vector<m1::TensorSpec> tensors = m1::checkpoint_tensors(config, dtype);
  size_t params = 0;
  for (const m1::TensorSpec& t : tensors) params += t.nbytes() * 8 / size_t(m1::dtype_bits(dtype));
  m1::write_checkpoint(o.out, tensors, m1::random_weights(config, dtype, o.seed), size_t(o.shard_mb * 1024 * 1024));
  std::fprintf(stderr, "m1-mkmodel: wrote %s: preset %s, %ld layers, %.1fM parameters, %.1f MB of %s weights\n",
               o.out.string().c_str(), o.preset.c_str(), long(config.num_hidden_layers), double(params) / 1e6,
               double(params * size_t(m1::dtype_bits(dtype)) / 8) / 1e6, o.dtype.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"m1-mkmodel: write a random MiniMax-M1 checkpoint (config.json, safetensors, tokenizer.json)"};
  Options o;
  app.add_option("--preset", o.preset, "Shape: tiny (tests), demo (quick start), bench (CPU benchmarks), m1 (real dimensions)")
      ->capture_default_str();
  app.add_option("--out", o.out, "Directory to write")->required();
  app.add_option("--layers", o.layers, "Number of layers (hybrid pattern: every 8th softmax)")->check(CLI::PositiveNumber);
  app.add_option("--attention", o.attention, "Attention of every layer: hybrid (the preset's), lightning or softmax")
      ->check(CLI::IsMember({"hybrid", "lightning", "softmax"}));
  app.add_option("--set", o.overrides, "Override a config.json field: FIELD=JSON (repeatable)");
  app.add_option("--dtype", o.dtype, "Weight dtype: bf16, f16 or f32")->capture_default_str();
  app.add_option("--seed", o.seed, "Random seed (same seed, same weights)")->capture_default_str();
  app.add_option("--tokenizer", o.tokenizer, "'full', or how many merges of the real tokenizer to keep (default: the preset's)");
  app.add_option("--tokenizer-source", o.tokenizer_source,
                 "A tokenizer.json to start from instead of the built-in MiniMax-M1 one (its tokenizer_config.json is "
                 "copied when it has one beside it)");
  app.add_option("--shard-size", o.shard_mb, "Shard size in MB (0: one model.safetensors)")->capture_default_str();
  app.add_flag("--force", o.force, "Overwrite a non-empty output directory");
  CLI11_PARSE(app, argc, argv);
  try {
    make_model(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "m1-mkmodel: %s\n", e.what());
    return 1;
  }
  return 0;
}
