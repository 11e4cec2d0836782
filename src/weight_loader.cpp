#include "weight_loader.h"

#include <algorithm>
#include <thread>

#include <spdlog/spdlog.h>

#include "json_text.h"
#include "m1/compressed_tensors.h"
#include "m1/error.h"

namespace m1 {
namespace {

std::string bytes_text(uint64_t bytes) {
  return bytes < 1000000000 ? fmt::format("{:.1f} MB", double(bytes) / 1e6) : fmt::format("{:.2f} GB", double(bytes) / 1e9);
}

std::string scheme_text(const QuantScheme& s) {
  return s.type == DType::kQ8 ? "int8 (one scale per row)" : fmt::format("int4 (one scale per {} inputs)", s.group_size);
}

bool is_packed(const ModelConfig& config, const Checkpoint& checkpoint, const WeightSpec& spec) {
  return config.quantization && spec.shape.size() == 2 && checkpoint.find(packed_tensor_name(module_name(spec)));
}

bool will_quantize(const LoadOptions& options, const WeightSpec& spec) {
  return options.quantize && quantized_by_default(spec.role, options.quantize_lm_head);
}

}  // namespace

LoadOptions parse_load_options(const std::string& quantize, int64_t group_size, bool quantize_lm_head, int threads) {
  LoadOptions o;
  o.threads = threads;
  if (quantize.empty()) {
    if (group_size != 0) fail("--group-size: applies to --quantize int4, and no --quantize was given");
    if (quantize_lm_head) fail("--quantize-lm-head: needs --quantize int8 or int4");
    return o;
  }
  o.quantize = parse_quant_scheme(quantize, group_size, "--quantize");
  o.quantize_lm_head = quantize_lm_head;
  return o;
}

WeightLoader::WeightLoader(const ModelConfig& config, const Checkpoint& checkpoint, const LoadOptions& options,
                           int ranks)
    : config_(config), checkpoint_(checkpoint), options_(options) {
  if (options_.quantize && config.quantization)
    fail("--quantize: the checkpoint is already quantized (config.json has a compressed-tensors quantization_config); "
         "load it without --quantize");
  if (options_.quantize_lm_head && config.tie_word_embeddings)
    fail("--quantize-lm-head: this model ties its LM head to the embeddings, which keep their stored type");
  if (options_.threads <= 0) options_.threads = int(std::max(1u, std::thread::hardware_concurrency()));
  options_.threads = std::max(1, options_.threads / std::max(1, ranks));  // the ranks quantize at once
  ranks_ = ranks;
  for (const WeightSpec& spec : weight_specs(config)) to_quantize_ += quantizes(spec) * ranks;
  start_ = last_report_ = std::chrono::steady_clock::now();
}

bool WeightLoader::packed(const WeightSpec& spec) const { return is_packed(config_, checkpoint_, spec); }

bool WeightLoader::quantizes(const WeightSpec& spec) const { return will_quantize(options_, spec); }

WeightLoader::Loaded WeightLoader::load(const WeightSpec& spec, const TensorSlice* slice) {
  Loaded out;
  auto cut = [&](const Weight& whole, const std::string& name) {
    if (!slice) return whole;
    out.part = slice_weight(whole, *slice, name);
    return out.part.weight;
  };
  if (packed(spec)) {
    const std::string module = module_name(spec);
    const QuantizationGroup* group = find_group(*config_.quantization, module);
    if (!group)
      fail("checkpoint: tensor {} is packed but no quantization_config.config_groups entry targets module {}",
           quote_name(packed_tensor_name(module)), quote_name(module));
    if (spec.role == WeightRole::kEmbed)
      fail("checkpoint: tensor {}: m1 reads embeddings as BF16, F16 or F32, not packed", quote_name(packed_tensor_name(module)));
    out.host = cut(read_packed_weight(checkpoint_, module, spec.shape[0], spec.shape[1], *group), packed_tensor_name(module));
    std::lock_guard lock(mutex_);
    for (const std::string& name : {packed_tensor_name(module), scale_tensor_name(module), shape_tensor_name(module)})
      used_.insert(name);
    return out;
  }
  const TensorView& view = checkpoint_.require(spec.name, spec.shape);
  {
    std::lock_guard lock(mutex_);
    used_.insert(spec.name);
  }
  const Weight whole = host_weight(view);
  if (!quantizes(spec)) {
    out.host = cut(whole, spec.name);
    return out;
  }
  const QuantScheme& scheme = *options_.quantize;
  const bool grouped = scheme.group_size > 0 && scheme.group_size < whole.cols;
  if (!slice || slice->axis == TensorSlice::Axis::kRows || grouped) {
    // Rows and whole groups quantize alone: quantize the slice. A column slice must fall on groups.
    if (slice && slice->axis == TensorSlice::Axis::kColumns) check_group_split(*slice, whole.cols, scheme.group_size, spec.name);
    out.copy = quantize(cut(whole, spec.name), scheme, spec.name, options_.threads);
    out.part = {};  // the float slice, quantized
    out.host = out.copy.weight();
  } else {
    // One scale per row: the whole rows' scale, then the columns cut.
    out.copy = quantize(whole, scheme, spec.name, options_.threads);
    out.host = cut(out.copy.weight(), spec.name);
  }
  // The source's pages go once quantized; with several ranks another may still be reading them
  // (a mapped file's pages then stay in the page cache, which the kernel may reclaim).
  if (ranks_ == 1) checkpoint_.release(view);
  std::lock_guard lock(mutex_);
  ++quantized_;
  read_bytes_ += view.nbytes;
  held_bytes_ += out.host.data_bytes() + out.host.scale_bytes();
  report(false);
  return out;
}

void WeightLoader::release(const WeightSpec& spec) {
  if (ranks_ != 1) return;
  if (!packed(spec)) return checkpoint_.release(checkpoint_.require(spec.name, spec.shape));
  const std::string module = module_name(spec);
  for (const std::string& name : {packed_tensor_name(module), scale_tensor_name(module)})
    if (const TensorView* view = checkpoint_.find(name)) checkpoint_.release(*view);
}

void WeightLoader::report(bool last) {
  if (to_quantize_ == 0) return;
  const auto now = std::chrono::steady_clock::now();
  if (!last && now - last_report_ < std::chrono::seconds(2)) return;
  last_report_ = now;
  const double seconds = std::chrono::duration<double>(now - start_).count();
  spdlog::info("{} {}/{} weights to {}: {} read, {} held, {:.1f} s", last ? "quantized" : "quantizing", quantized_,
               to_quantize_, scheme_text(*options_.quantize), bytes_text(read_bytes_), bytes_text(held_bytes_), seconds);
}

void WeightLoader::finish() {
  report(true);
  const size_t unused = checkpoint_.tensors().size() - used_.size();
  if (unused > 0) spdlog::warn("checkpoint holds {} tensors this config does not use; they are ignored", unused);
}

uint64_t loaded_weight_bytes(const ModelConfig& config, const Checkpoint& checkpoint, const WeightSpec& spec,
                             const LoadOptions& options) {
  if (is_packed(config, checkpoint, spec)) {
    const std::string module = module_name(spec);
    const TensorView* scale = checkpoint.find(scale_tensor_name(module));
    return checkpoint.find(packed_tensor_name(module))->nbytes + (scale ? scale->nbytes : 0);
  }
  const TensorView& view = checkpoint.require(spec.name, spec.shape);
  if (!will_quantize(options, spec)) return view.nbytes;
  const QuantScheme& s = *options.quantize;
  const Weight w{nullptr, s.type, spec.shape[0], spec.shape[1], nullptr, DType::kBF16, s.group_size > 0 ? s.group_size : spec.shape[1]};
  return w.data_bytes() + w.scale_bytes();
}

}  // namespace m1
