// The MiniMax-M1 forward pass, written once against the backend interface. With tensor
// parallelism every rank runs the same step on its own part of the weights (m1/sharding.h), and
// the partial sums meet in all-reduces after the attention output and after the MoE.

#include "m1/model.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include <spdlog/spdlog.h>

#include "lockstep.h"
#include "m1/error.h"
#include "m1/weights.h"
#include "sharded_state.h"
#include "weight_loader.h"

namespace m1 {

struct Model::Layer {
  bool lightning = true;
  Weight input_norm, post_norm;
  Weight qkv, output_gate, out_proj, attn_norm;  // lightning
  Weight q, k, v, o;                            // softmax
  std::vector<float> decay;                     // lightning: s of the rank's heads, computed (not stored in checkpoints)
  Weight decay_weight;                          // ... uploaded to the backend
  float attn_alpha = 1, attn_beta = 1;
  MoeWeights moe;
  bool shared_expert = false;
  Weight shared_gate, shared_up, shared_down, coefficient;

  // Attention rounds where its layer's projections do: on bf16 or quantized weights (a checkpoint
  // stored in F32 or F16 keeps fp32 products in either precision, DESIGN.md §4).
  Rounding attention_rounding() const {
    const Weight& projection = lightning ? qkv : q;
    return projection.dtype == DType::kBF16 || projection.quantized() ? Rounding::kAllowed : Rounding::kNever;
  }
};

// One rank: its backend, its part of the weights, and its activation buffers, grown to the
// largest step seen and then reused.
struct Model::Rank {
  Backend& backend;
  const RankShard& shard;
  Weight embed, final_norm, lm_head;
  std::vector<Layer> layers;
  size_t weight_bytes = 0;
  std::vector<QuantizedWeight> quantized;  // host copies the backend reads in place
  std::vector<SlicedWeight> parts;
  std::vector<Segment> segments;  // this step's, over the rank's part of each state

  int64_t rows = 0, logit_rows = 0;
  Buffer x, xn, attn_out, mlp_out, wide, o, gate, k, v, sums, shared_gate, shared_up, shared_out, coef;
  Buffer last, logits, logit_part;

  Rank(Backend& backend, const RankShard& shard) : backend(backend), shard(shard) {}
  int64_t heads_width(int64_t d) const { return shard.heads.count * d; }
  void reserve(const ModelConfig& c, int64_t rows, int64_t logit_rows);
};

void Model::Rank::reserve(const ModelConfig& c, int64_t want_rows, int64_t want_logit_rows) {
  if (want_rows > rows) {
    const int64_t H = c.hidden_size, hd = heads_width(c.head_dim), gd = int64_t(shard.kv_heads.size()) * c.head_dim;
    const int64_t F = c.shared_intermediate_size > 0 ? shard.shared_ffn.count : 0;
    for (Buffer* b : {&x, &xn, &attn_out, &mlp_out, &shared_out}) *b = Buffer(backend, want_rows, H);
    wide = Buffer(backend, want_rows, 3 * hd);
    o = Buffer(backend, want_rows, hd);
    gate = Buffer(backend, want_rows, hd);
    k = Buffer(backend, want_rows, gd);
    v = Buffer(backend, want_rows, gd);
    sums = Buffer(backend, shard.world > 1 ? want_rows : 0, 1);
    shared_gate = Buffer(backend, want_rows, F);
    shared_up = Buffer(backend, want_rows, F);
    coef = Buffer(backend, want_rows, 1);
    rows = want_rows;
  }
  if (want_logit_rows > logit_rows) {
    last = Buffer(backend, want_logit_rows, c.hidden_size);
    // Rank 0 gathers the whole rows of logits; each rank computes its vocabulary's columns.
    logits = Buffer(backend, shard.rank == 0 ? want_logit_rows : 0, c.vocab_size);
    logit_part = Buffer(backend, shard.world > 1 ? want_logit_rows : 0, shard.vocab.count);
    logit_rows = want_logit_rows;
  }
}

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
  Backend* ranks[] = {&backend};
  return load(dir, ranks, options);
}

std::unique_ptr<Model> Model::load(const std::filesystem::path& dir, std::span<Backend* const> ranks,
                                   const LoadOptions& options) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) fail("{}: model directory not found", dir.string());
  ModelConfig config = load_config(dir / "config.json");
  return std::make_unique<Model>(std::move(config), Checkpoint::open(dir), ranks, options);
}

namespace {

std::vector<Backend*> one(Backend& backend) { return {&backend}; }

// The quantization group of the model's weights (0: none, or one scale per row), which a split of
// a row-parallel product's inputs must respect.
int64_t quantization_group(const ModelConfig& c, const LoadOptions& options) {
  if (options.quantize) return options.quantize->group_size;
  int64_t group = 0;
  if (c.quantization)
    for (const QuantizationGroup& g : c.quantization->groups) group = std::max(group, g.group_size);
  return group;
}

}  // namespace

Model::Model(ModelConfig config, Checkpoint checkpoint, Backend& backend, const LoadOptions& options)
    : Model(std::move(config), std::move(checkpoint), one(backend), options) {}

Model::Model(ModelConfig config, Checkpoint checkpoint, std::span<Backend* const> ranks, const LoadOptions& options)
    : config_(std::move(config)), checkpoint_(std::move(checkpoint)), load_options_(options) {
  if (ranks.empty()) fail("a model needs at least one backend");
  const int world = int(ranks.size());
  for (int r = 0; r < world; ++r) {
    const DeviceInfo& d = ranks[size_t(r)]->device();
    if (d.rank != r || d.world != world)
      fail("backend {} of {} is rank {} of a group of {}: backends must be one group, in rank order", r, world, d.rank,
           d.world);
  }
  plan_ = plan_shards(config_, world, options.shard.moe, quantization_group(config_, options));
  for (int r = 0; r < world; ++r) ranks_.push_back(std::make_unique<Rank>(*ranks[size_t(r)], plan_.ranks[size_t(r)]));
  if (world > 1)
    lockstep_ = std::make_unique<Lockstep>(
        world, [this](int r) { ranks_[size_t(r)]->backend.attach_thread(); },
        [this](int r, const std::string& what) {
          for (auto& rank : ranks_) rank->backend.abort_collectives(fmt::format("rank {} failed: {}", r, what));
        });
  // Each rank reads its own part of every tensor, on its own thread (where its memory should be).
  WeightLoader loader(config_, checkpoint_, options, world);
  on_ranks([&](Rank& rank) { load_rank(rank, loader); });
  loader.finish();
  if (world > 1)
    for (const auto& rank : ranks_)
      spdlog::info("rank {}/{} ({}): {:.1f} MiB of weights", rank->shard.rank, world, rank->backend.name(),
                   double(rank->weight_bytes) / (1 << 20));
}

Model::~Model() = default;

Backend& Model::backend() const { return ranks_.front()->backend; }

std::vector<Backend*> Model::rank_backends() const {
  std::vector<Backend*> backends;
  for (const auto& rank : ranks_) backends.push_back(&rank->backend);
  return backends;
}

std::vector<size_t> Model::rank_weight_bytes() const {
  std::vector<size_t> bytes;
  for (const auto& rank : ranks_) bytes.push_back(rank->weight_bytes);
  return bytes;
}

void Model::on_ranks(const std::function<void(Rank&)>& fn) const {
  if (!lockstep_) {
    fn(*ranks_.front());
    return;
  }
  lockstep_->run([&](int r) { fn(*ranks_[size_t(r)]); });
}

void Model::load_rank(Rank& rank, WeightLoader& loader) {
  const ModelConfig& c = config_;
  const RankShard& shard = rank.shard;
  Backend& backend = rank.backend;
  auto upload = [&](const Weight& host) {
    rank.weight_bytes += host.data_bytes() + host.scale_bytes();
    return backend.upload(host);
  };
  rank.layers.resize(size_t(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    Layer& layer = rank.layers[size_t(l)];
    layer.lightning = c.is_lightning(l);
    layer.attn_alpha = float(layer.lightning ? c.linear_attention_alpha : c.full_attention_alpha);
    layer.attn_beta = float(layer.lightning ? c.linear_attention_beta : c.full_attention_beta);
    if (layer.lightning) {
      // The rank's heads' slopes, cut from the whole model's schedule (never recomputed for fewer heads).
      const std::vector<float> all = lightning_decay(c.num_attention_heads, l, c.num_hidden_layers);
      layer.decay.assign(all.begin() + shard.heads.begin, all.begin() + shard.heads.end());
      // The layer keeps the values: a backend may read them in place.
      layer.decay_weight = upload(Weight{layer.decay.data(), DType::kF32, 1, int64_t(layer.decay.size())});
    }
    layer.moe.top_k = c.num_experts_per_tok;
    layer.moe.first_expert = shard.experts.begin;
    layer.moe.w1.resize(size_t(shard.experts.count));
    layer.moe.w2.resize(size_t(shard.experts.count));
    layer.moe.w3.resize(size_t(shard.experts.count));
    layer.shared_expert = c.shared_intermediate_size > 0;
  }
  for (const WeightSpec& spec : weight_specs(c)) {
    const std::optional<TensorSlice> slice = rank_slice(spec, c, shard);
    if (!slice) continue;  // another rank's expert: that rank reads (and checks) it
    // A rank of a group of one holds every whole tensor: the stored bytes (or their quantized
    // copy). A backend that reads them in place (the CPU's, asked to) keeps what they point into;
    // one that copies them lets the quantized copy or the cut part go at once, and the
    // checkpoint's pages too.
    WeightLoader::Loaded loaded = loader.load(spec, shard.world > 1 ? &*slice : nullptr);
    const Weight weight = upload(loaded.host);
    if (weight.data == loaded.host.data) {
      if (loaded.copy) rank.quantized.push_back(std::move(loaded.copy));
      if (loaded.part.data) rank.parts.push_back(std::move(loaded.part));
    } else if (!loaded.copy && !loaded.part.data) {
      loader.release(spec);
    }
    using R = WeightRole;
    if (spec.role == R::kEmbed) { rank.embed = weight; continue; }
    if (spec.role == R::kFinalNorm) { rank.final_norm = weight; continue; }
    if (spec.role == R::kLmHead) { rank.lm_head = weight; continue; }
    Layer& l = rank.layers[size_t(spec.layer)];
    const size_t e = size_t(spec.expert - shard.experts.begin);
    switch (spec.role) {
      case R::kInputNorm: l.input_norm = weight; break;
      case R::kPostNorm: l.post_norm = weight; break;
      case R::kQkv: l.qkv = weight; break;
      case R::kOutputGate: l.output_gate = weight; break;
      case R::kOutProj: l.out_proj = weight; break;
      case R::kAttnNorm: l.attn_norm = weight; break;
      case R::kQ: l.q = weight; break;
      case R::kK: l.k = weight; break;
      case R::kV: l.v = weight; break;
      case R::kO: l.o = weight; break;
      case R::kRouter: l.moe.router = weight; break;
      case R::kW1: l.moe.w1[e] = weight; break;
      case R::kW2: l.moe.w2[e] = weight; break;
      case R::kW3: l.moe.w3[e] = weight; break;
      case R::kSharedGate: l.shared_gate = weight; break;
      case R::kSharedUp: l.shared_up = weight; break;
      case R::kSharedDown: l.shared_down = weight; break;
      case R::kCoefficient: l.coefficient = weight; break;
      default: break;  // the model-level roles are handled above
    }
  }
  if (c.tie_word_embeddings) rank.lm_head = rank.embed;
}

std::string Model::numerics() const {
  if (ranks_.size() == 1) return backend().numerics();
  return fmt::format("{}, tensor parallel {} ({} MoE split)", backend().numerics(), ranks_.size(),
                     moe_parallel_name(plan_.moe));
}

StateShape Model::state_shape() const {
  const std::vector<Layer>& layers = ranks_.front()->layers;
  const bool rounds = std::all_of(layers.begin(), layers.end(), [](const Layer& layer) {
    return layer.lightning || layer.attention_rounding() == Rounding::kAllowed;
  });
  return StateShape{config_.lightning_layers(), config_.num_attention_heads, config_.head_dim,
                    config_.softmax_layers(),   config_.num_key_value_heads,
                    rounds ? Rounding::kAllowed : Rounding::kNever};
}

std::unique_ptr<SequenceState> Model::new_sequence() const {
  if (!lockstep_) return backend().new_state(state_shape());
  std::vector<std::unique_ptr<SequenceState>> parts(ranks_.size());
  on_ranks([&](Rank& rank) {
    StateShape part = state_shape();
    part.heads = rank.shard.heads.count;
    part.kv_heads = int64_t(rank.shard.kv_heads.size());
    parts[size_t(rank.shard.rank)] = rank.backend.new_state(part);
  });
  return std::make_unique<ShardedState>(state_shape(), std::move(parts), *lockstep_, plan_);
}

void Model::check_batch(std::span<const BatchEntry> batch) const {
  std::unordered_set<const SequenceState*> seen;
  const StateShape shape = state_shape();
  for (size_t i = 0; i < batch.size(); ++i) {
    const BatchEntry& e = batch[i];
    if (!e.state) fail("batch entry {}: no sequence state", i);
    if (!seen.insert(e.state).second) fail("batch entry {}: the same sequence appears twice in one step", i);
    const StateShape& s = e.state->shape();
    const auto* sharded = dynamic_cast<const ShardedState*>(e.state);
    const bool ours = lockstep_ ? sharded && &sharded->lockstep() == lockstep_.get() : !sharded;
    if (!ours || s.lightning_layers != shape.lightning_layers || s.softmax_layers != shape.softmax_layers ||
        s.heads != shape.heads || s.head_dim != shape.head_dim || s.kv_heads != shape.kv_heads)
      fail("batch entry {}: sequence state was made for another model", i);
    if (e.tokens.empty()) fail("batch entry {}: no tokens", i);
    for (int32_t t : e.tokens)
      if (t < 0 || t >= config_.vocab_size) fail("token id {} is out of range for a vocabulary of {}", t, config_.vocab_size);
  }
}

void Model::attention(Rank& rank, const Layer& layer, int64_t index, const Mat& xn, Mat out) {
  const ModelConfig& c = config_;
  Backend& backend = rank.backend;
  const int64_t n = xn.rows, hd = rank.heads_width(c.head_dim);
  const int64_t gd = int64_t(rank.shard.kv_heads.size()) * c.head_dim;
  const int64_t slot = c.kind_index(index);
  Mat o = rank.o.as(n, hd);
  if (layer.lightning) {
    Mat qkv = rank.wide.as(n, 3 * hd), gate = rank.gate.as(n, hd);
    const Product products[] = {{&layer.qkv, qkv}, {&layer.output_gate, gate}};
    backend.matmuls(xn, products, Rounding::kAllowed);
    backend.lightning_attention(qkv, rank.segments, slot, layer.decay_weight, o, layer.attention_rounding());
    // DESIGN.md: 1e-6 here, not rms_norm_eps. The norm spans every head: split across ranks,
    // each row's sum of squares is all-reduced first (one float per row).
    if (rank.shard.world == 1) {
      backend.rmsnorm_gated(o, layer.attn_norm, 1e-6f, gate, o);
    } else {
      Mat sums = rank.sums.as(n, 1);
      backend.row_sum_squares(o, sums);
      backend.all_reduce_sum(sums);
      backend.rmsnorm_gated_split(o, sums, c.num_attention_heads * c.head_dim, layer.attn_norm, 1e-6f, gate, o);
    }
    backend.matmul(o, layer.out_proj, out, Rounding::kAllowed);
  } else {
    Mat q = rank.wide.as(n, hd), k = rank.k.as(n, gd), v = rank.v.as(n, gd);
    const Product products[] = {{&layer.q, q}, {&layer.k, k}, {&layer.v, v}};
    backend.matmuls(xn, products, Rounding::kAllowed);
    AttentionParams params{rank.shard.heads.count, int64_t(rank.shard.kv_heads.size()), c.head_dim, c.rotary_dim,
                           c.rope_theta, layer.attention_rounding()};
    backend.softmax_attention(q, k, v, rank.segments, slot, params, o);
    backend.matmul(o, layer.o, out, Rounding::kAllowed);
  }
  backend.all_reduce_sum(out);  // each rank's heads' share of the output projection
}

void Model::forward(std::span<const BatchEntry> batch, StepLogits& out) {
  check_batch(batch);
  const ModelConfig& c = config_;
  tokens_.clear();
  wanted_rows_.clear();
  for (auto& rank : ranks_) rank->segments.clear();
  out.backend_ = &backend();
  out.device_ = {};
  out.on_host_ = false;
  out.vocab_ = c.vocab_size;
  out.first_row_.assign(1, 0);
  for (const BatchEntry& e : batch) {
    const int64_t row = int64_t(tokens_.size()), count = int64_t(e.tokens.size());
    const auto* sharded = dynamic_cast<const ShardedState*>(e.state);
    for (auto& rank : ranks_)
      rank->segments.push_back(Segment{row, count, sharded ? &sharded->part(rank->shard.rank) : e.state});
    tokens_.insert(tokens_.end(), e.tokens.begin(), e.tokens.end());
    if (e.logits == LogitsFor::kLast) wanted_rows_.push_back(row + count - 1);
    if (e.logits == LogitsFor::kAll)
      for (int64_t i = 0; i < count; ++i) wanted_rows_.push_back(row + i);
    out.first_row_.push_back(int64_t(wanted_rows_.size()));
  }
  const int64_t n = int64_t(tokens_.size()), m = int64_t(wanted_rows_.size());
  if (n == 0) return;
  vocab_widths_.clear();
  for (const auto& rank : ranks_) vocab_widths_.push_back(rank->shard.vocab.count);
  // Room first, on this thread: a rank that failed to allocate inside the step would leave its
  // peers waiting in a collective.
  for (auto& rank : ranks_) rank->reserve(c, n, m);

  on_ranks([&](Rank& rank) { rank_step(rank, n, m); });
  if (m > 0) out.device_ = ranks_.front()->logits.as(m, c.vocab_size);
  for (const BatchEntry& e : batch) {
    const int64_t count = int64_t(e.tokens.size());
    if (auto* sharded = dynamic_cast<ShardedState*>(e.state))
      sharded->advance_all(count);
    else
      e.state->advance(count);
  }
}

void Model::rank_step(Rank& rank, int64_t n, int64_t m) {
  Backend& backend = rank.backend;
  backend.begin_step(rank.segments, m);
  try {
    run_step(rank, n, m);
  } catch (...) {
    if (!backend.abandon_step()) throw;
    run_step(rank, n, m);  // nothing of the step had run: make the calls for real
  }
  if (!backend.end_step()) run_step(rank, n, m);
  // A group's step is over when every rank's work has run, so that a failure shows in its step.
  if (rank.shard.world > 1) backend.synchronize();
}

// The step's calls, from the embedding to the logits of the wanted rows. They have no effect on
// the host, so a backend may have them made twice (see Backend::begin_step).
void Model::run_step(Rank& rank, int64_t n, int64_t m) {
  const ModelConfig& c = config_;
  Backend& backend = rank.backend;
  const int64_t H = c.hidden_size;
  Mat x = rank.x.as(n, H), xn = rank.xn.as(n, H), attn_out = rank.attn_out.as(n, H), mlp_out = rank.mlp_out.as(n, H);
  // Each rank embeds the tokens of its vocabulary (zeros for the others): the sum is exact.
  backend.embed(rank.embed, rank.shard.vocab.begin, tokens_, x);
  backend.all_reduce_sum(x);
  // Each residual add and the norm after it (the post-attention norm, the next layer's input norm)
  // in one call, which a backend may run as one pass.
  const float eps = float(c.rms_norm_eps);
  if (!rank.layers.empty()) backend.rmsnorm(x, rank.layers[0].input_norm, eps, xn);
  for (size_t l = 0; l < rank.layers.size(); ++l) {
    const Layer& layer = rank.layers[l];
    attention(rank, layer, int64_t(l), xn, attn_out);
    backend.add_scaled_rmsnorm(c.postnorm ? xn : x, layer.attn_alpha, attn_out, layer.attn_beta, x, layer.post_norm,
                               eps, xn);
    mlp(rank, layer, xn, mlp_out);
    if (l + 1 < rank.layers.size())
      backend.add_scaled_rmsnorm(c.postnorm ? xn : x, float(c.mlp_alpha), mlp_out, float(c.mlp_beta), x,
                                 rank.layers[l + 1].input_norm, eps, xn);
    else
      backend.add_scaled(c.postnorm ? xn : x, float(c.mlp_alpha), mlp_out, float(c.mlp_beta), x);
  }
  if (m > 0) {
    Mat last = rank.last.as(m, H);
    backend.gather_rows(x, wanted_rows_, last);
    backend.rmsnorm(last, rank.final_norm, float(c.rms_norm_eps), last);
    if (rank.shard.world == 1) {
      backend.matmul(last, rank.lm_head, rank.logits.as(m, c.vocab_size), Rounding::kNever);  // fp32, as the M1 report requires
    } else {
      // Each rank's vocabulary's columns, gathered on rank 0, where tokens are drawn.
      const Mat part = rank.logit_part.as(m, rank.shard.vocab.count);
      backend.matmul(last, rank.lm_head, part, Rounding::kNever);
      backend.gather_columns(part, vocab_widths_, rank.shard.rank == 0 ? rank.logits.as(m, c.vocab_size) : Mat{});
    }
  }
}

void Model::mlp(Rank& rank, const Layer& layer, const Mat& xn, Mat out) {
  Backend& backend = rank.backend;
  backend.moe(xn, layer.moe, out);
  if (layer.shared_expert) {
    const int64_t n = xn.rows, F = rank.shard.shared_ffn.count;
    Mat gate = rank.shared_gate.as(n, F), up = rank.shared_up.as(n, F);
    Mat shared = rank.shared_out.as(n, config_.hidden_size), coef = rank.coef.as(n, 1);
    backend.matmul(xn, layer.shared_gate, gate, Rounding::kAllowed);
    backend.matmul(xn, layer.shared_up, up, Rounding::kAllowed);
    backend.swiglu(gate, up);
    backend.matmul(gate, layer.shared_down, shared, Rounding::kAllowed);
    backend.matmul(xn, layer.coefficient, coef, Rounding::kNever);
    // Linear in the MoE's and the shared MLP's outputs, so each rank blends its partial sums.
    backend.blend_sigmoid(out, shared, coef);
  }
  backend.all_reduce_sum(out);  // each rank's experts' (or intermediate slice's) share
}

}  // namespace m1
