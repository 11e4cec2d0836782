// The MiniMax-M1 forward pass, written once against the backend interface.

#include "m1/model.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "m1/error.h"
#include "m1/weights.h"
#include "weight_loader.h"

namespace m1 {

struct Model::Layer {
  bool lightning = true;
  Weight input_norm, post_norm;
  Weight qkv, output_gate, out_proj, attn_norm;  // lightning
  Weight q, k, v, o;                            // softmax
  std::vector<float> decay;                     // lightning: s per head, computed (not stored in checkpoints)
  Weight decay_weight;                          // ... uploaded to the backend
  float attn_alpha = 1, attn_beta = 1;
  MoeWeights moe;
  bool shared_expert = false;
  Weight shared_gate, shared_up, shared_down, coefficient;
};

// Activation buffers, grown to the largest step seen and then reused.
struct Model::Workspace {
  int64_t rows = 0, logit_rows = 0;
  Buffer x, xn, attn_out, mlp_out, wide, o, gate, k, v, shared_gate, shared_up, shared_out, coef;
  Buffer last, logits;
  std::vector<int32_t> tokens;
  std::vector<Segment> segments;
  std::vector<int64_t> wanted_rows;
};

std::vector<float> lightning_decay(int64_t heads, int64_t layer, int64_t layers) {
  // ALiBi slopes: a geometric series for a power of two; otherwise the power-of-two part and then
  // every other slope of the doubled schedule.
  auto power_of_two_slopes = [](int64_t n) {
    double start = std::pow(2.0, -std::pow(2.0, -(std::log2(double(n)) - 3)));
    std::vector<double> s;
    for (int64_t i = 0; i < n; ++i) s.push_back(std::pow(start, double(i + 1)));
    return s;
  };
  int64_t base = int64_t(1) << int64_t(std::floor(std::log2(double(heads))));
  std::vector<double> slopes = power_of_two_slopes(base);
  std::vector<double> doubled = power_of_two_slopes(2 * base);
  for (int64_t i = 0; int64_t(slopes.size()) < heads; i += 2) slopes.push_back(doubled[size_t(i)]);
  const double depth = 1.0 - double(layer) / double(layers - 1) + 1e-5;
  std::vector<float> decay;
  for (double s : slopes) decay.push_back(float(s * depth));
  return decay;
}

std::span<float> StepLogits::row(size_t entry, int64_t i) {
  if (!on_host_) {
    host_.resize(size_t(device_.size()));
    if (device_.size() > 0) backend_->to_host(device_, host_.data());
    on_host_ = true;
  }
  return {host_.data() + (first_row_[entry] + i) * vocab_, size_t(vocab_)};
}

std::unique_ptr<Model> Model::load(const std::filesystem::path& dir, Backend& backend, const LoadOptions& options) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) fail("{}: model directory not found", dir.string());
  ModelConfig config = load_config(dir / "config.json");
  return std::make_unique<Model>(std::move(config), Checkpoint::open(dir), backend, options);
}

Model::Model(ModelConfig config, Checkpoint checkpoint, Backend& backend, const LoadOptions& options)
    : config_(std::move(config)),
      checkpoint_(std::move(checkpoint)),
      load_options_(options),
      backend_(backend),
      ws_(std::make_unique<Workspace>()) {
  const ModelConfig& c = config_;
  layers_.resize(size_t(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    Layer& layer = layers_[size_t(l)];
    layer.lightning = c.is_lightning(l);
    layer.attn_alpha = float(layer.lightning ? c.linear_attention_alpha : c.full_attention_alpha);
    layer.attn_beta = float(layer.lightning ? c.linear_attention_beta : c.full_attention_beta);
    if (layer.lightning) {
      layer.decay = lightning_decay(c.num_attention_heads, l, c.num_hidden_layers);
      // The layer keeps the values: the CPU backend uses them in place.
      layer.decay_weight = backend_.upload(Weight{layer.decay.data(), DType::kF32, 1, int64_t(layer.decay.size())});
    }
    layer.moe.top_k = c.num_experts_per_tok;
    layer.moe.w1.resize(size_t(c.num_local_experts));
    layer.moe.w2.resize(size_t(c.num_local_experts));
    layer.moe.w3.resize(size_t(c.num_local_experts));
    layer.shared_expert = c.shared_intermediate_size > 0;
  }
  WeightLoader loader(c, checkpoint_, options);
  for (const WeightSpec& spec : weight_specs(c)) {
    WeightLoader::Loaded loaded = loader.load(spec);
    Weight& weight = *slot(spec);
    weight = backend_.upload(loaded.host);
    if (loaded.copy && weight.data == loaded.host.data) quantized_.push_back(std::move(loaded.copy));  // read in place
  }
  if (c.tie_word_embeddings) lm_head_ = embed_;
  loader.finish();
}

Model::~Model() = default;

Weight* Model::slot(const WeightSpec& spec) {
  using R = WeightRole;
  switch (spec.role) {
    case R::kEmbed: return &embed_;
    case R::kFinalNorm: return &final_norm_;
    case R::kLmHead: return &lm_head_;
    default: break;
  }
  Layer& l = layers_[size_t(spec.layer)];
  switch (spec.role) {
    case R::kInputNorm: return &l.input_norm;
    case R::kPostNorm: return &l.post_norm;
    case R::kQkv: return &l.qkv;
    case R::kOutputGate: return &l.output_gate;
    case R::kOutProj: return &l.out_proj;
    case R::kAttnNorm: return &l.attn_norm;
    case R::kQ: return &l.q;
    case R::kK: return &l.k;
    case R::kV: return &l.v;
    case R::kO: return &l.o;
    case R::kRouter: return &l.moe.router;
    case R::kW1: return &l.moe.w1[size_t(spec.expert)];
    case R::kW2: return &l.moe.w2[size_t(spec.expert)];
    case R::kW3: return &l.moe.w3[size_t(spec.expert)];
    case R::kSharedGate: return &l.shared_gate;
    case R::kSharedUp: return &l.shared_up;
    case R::kSharedDown: return &l.shared_down;
    case R::kCoefficient: return &l.coefficient;
    default: return nullptr;  // the model-level roles are handled above
  }
}

StateShape Model::state_shape() const {
  return StateShape{config_.lightning_layers(), config_.num_attention_heads, config_.head_dim,
                    config_.softmax_layers(), config_.num_key_value_heads};
}

std::unique_ptr<SequenceState> Model::new_sequence() const { return backend_.new_state(state_shape()); }

void Model::check_batch(std::span<const BatchEntry> batch) const {
  std::unordered_set<const SequenceState*> seen;
  const StateShape shape = state_shape();
  for (size_t i = 0; i < batch.size(); ++i) {
    const BatchEntry& e = batch[i];
    if (!e.state) fail("batch entry {}: no sequence state", i);
    if (!seen.insert(e.state).second) fail("batch entry {}: the same sequence appears twice in one step", i);
    const StateShape& s = e.state->shape();
    if (s.lightning_layers != shape.lightning_layers || s.softmax_layers != shape.softmax_layers ||
        s.heads != shape.heads || s.head_dim != shape.head_dim || s.kv_heads != shape.kv_heads)
      fail("batch entry {}: sequence state was made for another model", i);
    if (e.tokens.empty()) fail("batch entry {}: no tokens", i);
    for (int32_t t : e.tokens)
      if (t < 0 || t >= config_.vocab_size) fail("token id {} is out of range for a vocabulary of {}", t, config_.vocab_size);
  }
}

void Model::attention(const Layer& layer, int64_t index, std::span<const Segment> segments, const Mat& xn, Mat out) {
  const ModelConfig& c = config_;
  const int64_t n = xn.rows, hd = c.num_attention_heads * c.head_dim, gd = c.num_key_value_heads * c.head_dim;
  const int64_t slot = c.kind_index(index);
  Workspace& ws = *ws_;
  Mat o = ws.o.as(n, hd);
  if (layer.lightning) {
    Mat qkv = ws.wide.as(n, 3 * hd);
    backend_.matmul(xn, layer.qkv, qkv, Rounding::kAllowed);
    backend_.silu(qkv);
    backend_.lightning_attention(qkv, segments, slot, layer.decay_weight, o);
    Mat gate = ws.gate.as(n, hd);
    backend_.matmul(xn, layer.output_gate, gate, Rounding::kAllowed);
    backend_.rmsnorm_gated(o, layer.attn_norm, 1e-6f, gate, o);  // DESIGN.md: 1e-6 here, not rms_norm_eps
    backend_.matmul(o, layer.out_proj, out, Rounding::kAllowed);
  } else {
    Mat q = ws.wide.as(n, hd), k = ws.k.as(n, gd), v = ws.v.as(n, gd);
    backend_.matmul(xn, layer.q, q, Rounding::kAllowed);
    backend_.matmul(xn, layer.k, k, Rounding::kAllowed);
    backend_.matmul(xn, layer.v, v, Rounding::kAllowed);
    AttentionParams params{c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dim, c.rope_theta};
    backend_.softmax_attention(q, k, v, segments, slot, params, o);
    backend_.matmul(o, layer.o, out, Rounding::kAllowed);
  }
}

void Model::forward(std::span<const BatchEntry> batch, StepLogits& out) {
  check_batch(batch);
  const ModelConfig& c = config_;
  Workspace& ws = *ws_;
  ws.tokens.clear();
  ws.segments.clear();
  ws.wanted_rows.clear();
  out.backend_ = &backend_;
  out.device_ = {};
  out.on_host_ = false;
  out.vocab_ = c.vocab_size;
  out.first_row_.assign(1, 0);
  for (const BatchEntry& e : batch) {
    const int64_t row = int64_t(ws.tokens.size()), count = int64_t(e.tokens.size());
    ws.segments.push_back(Segment{row, count, e.state});
    ws.tokens.insert(ws.tokens.end(), e.tokens.begin(), e.tokens.end());
    if (e.logits == LogitsFor::kLast) ws.wanted_rows.push_back(row + count - 1);
    if (e.logits == LogitsFor::kAll)
      for (int64_t i = 0; i < count; ++i) ws.wanted_rows.push_back(row + i);
    out.first_row_.push_back(int64_t(ws.wanted_rows.size()));
  }
  const int64_t n = int64_t(ws.tokens.size()), m = int64_t(ws.wanted_rows.size());
  if (n == 0) return;
  reserve_workspace(n, m);

  backend_.begin_step(ws.segments, m);
  try {
    run_step(n, m);
  } catch (...) {
    if (!backend_.abandon_step()) throw;
    run_step(n, m);  // nothing of the step had run: make the calls for real
  }
  if (!backend_.end_step()) run_step(n, m);
  if (m > 0) out.device_ = ws.logits.as(m, c.vocab_size);
  for (const Segment& s : ws.segments) s.state->advance(s.count);
}

// The step's calls, from the embedding to the logits of the wanted rows. They have no effect on
// the host, so a backend may have them made twice (see Backend::begin_step).
void Model::run_step(int64_t n, int64_t m) {
  const ModelConfig& c = config_;
  Workspace& ws = *ws_;
  const int64_t H = c.hidden_size;
  Mat x = ws.x.as(n, H), xn = ws.xn.as(n, H), attn_out = ws.attn_out.as(n, H), mlp_out = ws.mlp_out.as(n, H);
  backend_.embed(embed_, ws.tokens, x);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& layer = layers_[l];
    backend_.rmsnorm(x, layer.input_norm, float(c.rms_norm_eps), xn);
    attention(layer, int64_t(l), ws.segments, xn, attn_out);
    backend_.add_scaled(c.postnorm ? xn : x, layer.attn_alpha, attn_out, layer.attn_beta, x);
    backend_.rmsnorm(x, layer.post_norm, float(c.rms_norm_eps), xn);
    mlp(layer, xn, mlp_out);
    backend_.add_scaled(c.postnorm ? xn : x, float(c.mlp_alpha), mlp_out, float(c.mlp_beta), x);
  }
  if (m > 0) {
    Mat last = ws.last.as(m, H), logits = ws.logits.as(m, c.vocab_size);
    backend_.gather_rows(x, ws.wanted_rows, last);
    backend_.rmsnorm(last, final_norm_, float(c.rms_norm_eps), last);
    backend_.matmul(last, lm_head_, logits, Rounding::kNever);  // fp32, as the M1 report requires
  }
}

void Model::mlp(const Layer& layer, const Mat& xn, Mat out) {
  backend_.moe(xn, layer.moe, out);
  if (!layer.shared_expert) return;
  Workspace& ws = *ws_;
  const int64_t n = xn.rows, F = config_.intermediate_size;
  Mat gate = ws.shared_gate.as(n, F), up = ws.shared_up.as(n, F);
  Mat shared = ws.shared_out.as(n, config_.hidden_size), coef = ws.coef.as(n, 1);
  backend_.matmul(xn, layer.shared_gate, gate, Rounding::kAllowed);
  backend_.matmul(xn, layer.shared_up, up, Rounding::kAllowed);
  backend_.swiglu(gate, up);
  backend_.matmul(gate, layer.shared_down, shared, Rounding::kAllowed);
  backend_.matmul(xn, layer.coefficient, coef, Rounding::kNever);
  backend_.blend_sigmoid(out, shared, coef);
}

void Model::reserve_workspace(int64_t rows, int64_t logit_rows) {
  const ModelConfig& c = config_;
  Workspace& ws = *ws_;
  if (rows > ws.rows) {
    const int64_t H = c.hidden_size, hd = c.num_attention_heads * c.head_dim, gd = c.num_key_value_heads * c.head_dim;
    const int64_t F = c.shared_intermediate_size > 0 ? c.intermediate_size : 0;
    for (Buffer* b : {&ws.x, &ws.xn, &ws.attn_out, &ws.mlp_out, &ws.shared_out}) *b = Buffer(backend_, rows, H);
    ws.wide = Buffer(backend_, rows, 3 * hd);
    ws.o = Buffer(backend_, rows, hd);
    ws.gate = Buffer(backend_, rows, hd);
    ws.k = Buffer(backend_, rows, gd);
    ws.v = Buffer(backend_, rows, gd);
    ws.shared_gate = Buffer(backend_, rows, F);
    ws.shared_up = Buffer(backend_, rows, F);
    ws.coef = Buffer(backend_, rows, 1);
    ws.rows = rows;
  }
  if (logit_rows > ws.logit_rows) {
    ws.last = Buffer(backend_, logit_rows, c.hidden_size);
    ws.logits = Buffer(backend_, logit_rows, c.vocab_size);
    ws.logit_rows = logit_rows;
  }
}

}  // namespace m1
