// m1-quantize: writes a quantized copy of a BF16/F16/F32 checkpoint in the compressed-tensors
// "pack-quantized" format (as llm-compressor writes it and vLLM loads it): config.json gains a
// quantization_config, each quantized weight becomes MODULE.weight_packed / weight_scale /
// weight_shape, sharded with an index. m1 loads the result in place, with the same weights
// --quantize makes at load (the same quantizer).

#include <chrono>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "m1/compressed_tensors.h"
#include "m1/config.h"
#include "m1/error.h"
#include "m1/model.h"
#include "m1/quantize.h"
#include "m1/safetensors.h"
#include "m1/weights.h"

namespace fs = std::filesystem;
using ordered_json = nlohmann::ordered_json;

namespace {

struct Options {
  fs::path model, out;
  std::string quantize;
  int64_t group_size = 0;
  bool quantize_lm_head = false;
  double shard_mb = 5000;
  int threads = 0;
  bool force = false;
};

// The files beside the weights a loader needs (tokenizer, chat template, generation settings,
// remote code); weights, their index and other engines' files are not copied.
bool copied(const fs::path& file) {
  const std::string name = file.filename().string(), ext = file.extension().string();
  if (name == "config.json" || name == "model.safetensors.index.json") return false;
  return ext == ".json" || ext == ".py" || ext == ".txt" || ext == ".jinja" || ext == ".model" || ext == ".tiktoken";
}

ordered_json read_ordered(const fs::path& path) {
  std::ifstream in(path);
  if (!in) m1::fail("{}: cannot open", path.string());
  ordered_json j = ordered_json::parse(in, nullptr, false);
  if (j.is_discarded()) m1::fail("{}: not valid JSON", path.string());
  return j;
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  if (!out.flush()) m1::fail("{}: write failed (disk full?)", path.string());
}

// What each output tensor is: a stored tensor copied, or one of a quantized module's three.
struct Plan {
  std::vector<m1::TensorSpec> tensors;
  std::map<std::string, const m1::TensorView*> copies;       // output name -> source
  std::map<std::string, const m1::WeightSpec*> quantized;    // output name -> the weight it packs
  std::vector<std::string> ignore;                           // linear modules kept as stored
};

Plan plan(const m1::Checkpoint& checkpoint, const std::vector<m1::WeightSpec>& specs,
          const m1::LoadOptions& load) {
  Plan p;
  for (const m1::WeightSpec& spec : specs) {
    const m1::TensorView& view = checkpoint.require(spec.name, spec.shape);
    if (m1::quantized_by_default(spec.role, load.quantize_lm_head)) {
      const m1::QuantScheme& s = *load.quantize;
      const m1::Weight layout{nullptr, s.type, spec.shape[0], spec.shape[1], nullptr, m1::DType::kBF16,
                              s.group_size > 0 ? s.group_size : spec.shape[1]};
      for (const m1::TensorSpec& t : m1::packed_tensor_specs(m1::module_name(spec), layout)) {
        p.tensors.push_back(t);
        p.quantized[t.name] = &spec;
      }
      continue;
    }
    p.tensors.push_back(m1::TensorSpec{spec.name, view.weight_dtype(), spec.shape});
    p.copies[spec.name] = &view;
    const bool linear = spec.role == m1::WeightRole::kRouter || spec.role == m1::WeightRole::kCoefficient ||
                        spec.role == m1::WeightRole::kLmHead;
    if (linear) p.ignore.push_back(m1::module_name(spec));
  }
  return p;
}

void quantize_checkpoint(const Options& o) {
  const m1::LoadOptions load = m1::parse_load_options(o.quantize, o.group_size, o.quantize_lm_head, o.threads);
  if (!load.quantize) m1::fail("--quantize: required (int8 or int4)");
  if (o.shard_mb < 0) m1::fail("--shard-size: must be 0 (one file) or more, got {}", o.shard_mb);
  std::error_code ec;
  if (!fs::is_directory(o.model, ec)) m1::fail("--model: {} is not a directory", o.model.string());
  if (fs::exists(o.out, ec) && fs::equivalent(o.out, o.model, ec)) m1::fail("--out: {} is the input directory", o.out.string());
  if (fs::exists(o.out, ec) && !fs::is_empty(o.out, ec) && !o.force)
    m1::fail("--out: {} exists and is not empty (use --force to overwrite)", o.out.string());
  const m1::ModelConfig config = m1::load_config(o.model / "config.json");
  if (config.quantization)
    m1::fail("--model: {} is already quantized (config.json has a compressed-tensors quantization_config)", o.model.string());
  if (load.quantize_lm_head && config.tie_word_embeddings)
    m1::fail("--quantize-lm-head: this model ties its LM head to the embeddings, which keep their stored type");
  const m1::Checkpoint checkpoint = m1::Checkpoint::open(o.model);
  const std::vector<m1::WeightSpec> specs = m1::weight_specs(config);
  const Plan p = plan(checkpoint, specs, load);
  const int threads = o.threads > 0 ? o.threads : int(std::max(1u, std::thread::hardware_concurrency()));

  fs::create_directories(o.out, ec);
  if (ec) m1::fail("--out: cannot create {}: {}", o.out.string(), ec.message());
  ordered_json config_json = read_ordered(o.model / "config.json");
  config_json["quantization_config"] = m1::quantization_config_to_json(
      m1::make_quantization_config(m1::dtype_bits(load.quantize->type), load.quantize->group_size, p.ignore));
  write_text(o.out / "config.json", config_json.dump(2) + "\n");
  for (const fs::directory_entry& e : fs::directory_iterator(o.model))
    if (e.is_regular_file() && copied(e.path())) fs::copy_file(e.path(), o.out / e.path().filename(), fs::copy_options::overwrite_existing);

  // write_safetensors lays a shard out by element size: a module's weight_shape (I64) comes first,
  // then its weight_packed (I32), where it is quantized, and its weight_scale (BF16) last, so its
  // scales wait for their turn (an eighth of the codes' size at int4).
  std::map<std::string, std::vector<std::byte>> pending_scales;
  size_t done = 0, total = p.quantized.size() / 3;
  uint64_t read = 0, written = 0;
  const auto start = std::chrono::steady_clock::now();
  auto fill = [&](const m1::TensorSpec& t, std::span<std::byte> out) {
    if (auto copy = p.copies.find(t.name); copy != p.copies.end()) {
      std::memcpy(out.data(), copy->second->data, out.size());
      return;
    }
    const m1::WeightSpec& spec = *p.quantized.at(t.name);
    const std::string module = m1::module_name(spec);
    if (t.name == m1::shape_tensor_name(module)) {
      const int64_t shape[2] = {spec.shape[0], spec.shape[1]};
      std::memcpy(out.data(), shape, sizeof shape);
    } else if (t.name == m1::packed_tensor_name(module)) {
      const m1::TensorView& view = checkpoint.require(spec.name, spec.shape);
      const m1::QuantizedWeight q = m1::quantize(m1::host_weight(view), *load.quantize, spec.name, threads);
      checkpoint.release(view);
      std::memcpy(out.data(), q.weight().data, out.size());
      const std::span<const std::byte> scales(static_cast<const std::byte*>(q.weight().scales), q.weight().scale_bytes());
      pending_scales[module].assign(scales.begin(), scales.end());
      read += view.nbytes;
      written += q.weight().data_bytes() + q.weight().scale_bytes();
      std::fprintf(stderr, "\rm1-quantize: %zu/%zu weights, %.2f GB read, %.2f GB written, %.0f s", ++done, total,
                   double(read) / 1e9, double(written) / 1e9,
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    } else {
      const std::vector<std::byte>& scales = pending_scales.at(module);
      std::memcpy(out.data(), scales.data(), out.size());
      pending_scales.erase(module);
    }
  };
  m1::write_checkpoint(o.out, p.tensors, fill, size_t(o.shard_mb * 1e6));
  std::fprintf(stderr, "\nm1-quantize: wrote %s: %zu weights quantized to %s, %.2f GB -> %.2f GB\n", o.out.string().c_str(), total,
               o.quantize.c_str(), double(read) / 1e9, double(written) / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"m1-quantize: write an int8 or int4 copy of a checkpoint in the compressed-tensors pack-quantized format"};
  Options o;
  app.add_option("--model", o.model, "Checkpoint directory to read (BF16, F16 or F32)")->required();
  app.add_option("--out", o.out, "Directory to write")->required();
  app.add_option("--quantize", o.quantize, "int8 (one scale per output row) or int4 (one scale per group of inputs)")->required();
  app.add_option("--group-size", o.group_size, "int4: inputs per scale, a multiple of 32 (default 32)");
  app.add_flag("--quantize-lm-head", o.quantize_lm_head, "Quantize the LM head too (kept in its stored type by default)");
  app.add_option("--shard-size", o.shard_mb, "Shard size in MB (0: one model.safetensors)")->capture_default_str();
  app.add_option("--threads", o.threads, "Quantizing threads (0: one per core)")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_flag("--force", o.force, "Write into a non-empty output directory");
  CLI11_PARSE(app, argc, argv);
  try {
    quantize_checkpoint(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "m1-quantize: %s\n", e.what());
    return 1;
  }
  return 0;
}
