#include "m1/generation.h"

#include <chrono>
#include <fstream>

#include <nlohmann/json.hpp>

#include "m1/error.h"
#include "m1/prefill.h"
#include "m1/stop.h"

namespace m1 {
namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// tokenizer_config.json's eos_token: a string, or an object with "content"; empty if the file or
// the field is absent. A file that is there but unreadable is an error, not a silent default.
std::string configured_eos(const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "tokenizer_config.json";
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return {};
  std::ifstream in(path);
  auto j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail("{}: not a JSON object", path.string());
  if (!j.contains("eos_token")) return {};
  const auto& eos = j["eos_token"];
  if (eos.is_string()) return eos.get<std::string>();
  if (eos.is_object() && eos.contains("content") && eos["content"].is_string()) return eos["content"].get<std::string>();
  return {};
}

}  // namespace

int32_t end_of_turn_token(const std::filesystem::path& model_dir, const Tokenizer& tokenizer) {
  std::string text = configured_eos(model_dir);
  if (text.empty()) text = "<end_of_sentence>";
  auto id = tokenizer.token_id(text);
  if (!id) fail("{}: the end-of-turn token '{}' is not in tokenizer.json", model_dir.string(), text);
  return *id;
}

GenerationResult generate(Model& model, const Tokenizer& tokenizer, std::span<const int32_t> prompt,
                          const GenerationParams& params, const std::function<void(std::string_view)>& on_text,
                          bool keep_prompt_logits, PromptReuse* reuse) {
  if (prompt.empty()) fail("prompt: empty (at least one token is needed)");
  if (params.prefill_chunk < 1) fail("prefill_chunk must be at least 1, got {}", params.prefill_chunk);
  if (params.max_tokens < 0) fail("max_tokens must be 0 or more, got {}", params.max_tokens);
  validate(params.sampling);
  const int64_t context = model.config().max_position_embeddings;
  if (int64_t(prompt.size()) >= context)
    fail("prompt: {} tokens leave no room to generate within the model's context of {} tokens", prompt.size(), context);
  const int64_t max_tokens = std::min(params.max_tokens, context - int64_t(prompt.size()));

  GenerationResult result;
  std::unique_ptr<SequenceState> seq = reuse && reuse->resume ? std::move(reuse->resume) : model.new_sequence();
  const int64_t length = int64_t(prompt.size());
  if (seq->length() >= length)
    fail("prompt: a resumed state of {} tokens leaves none of the {} prompt tokens to prefill", seq->length(), length);
  const int64_t alignment = std::max<int64_t>(1, model.backend().prefill_alignment());
  const int64_t stop = reuse ? reuse->snapshot_at : 0;
  StepLogits logits;
  auto start = std::chrono::steady_clock::now();
  for (int64_t pos = seq->length(); pos < length;) {
    const int64_t end = prefill_chunk_end(pos, length, params.prefill_chunk, alignment, stop);
    LogitsFor wanted = keep_prompt_logits ? LogitsFor::kAll : end == length ? LogitsFor::kLast : LogitsFor::kNone;
    BatchEntry entry{seq.get(), prompt.subspan(size_t(pos), size_t(end - pos)), wanted};
    model.forward({&entry, 1}, logits);
    if (keep_prompt_logits)
      for (int64_t i = 0; i < logits.rows(0); ++i)
        result.prompt_logits.insert(result.prompt_logits.end(), logits.row(0, i).begin(), logits.row(0, i).end());
    pos = end;
    if (pos == stop && reuse->on_snapshot) reuse->on_snapshot(*seq);
  }
  result.prefill_seconds = seconds_since(start);

  start = std::chrono::steady_clock::now();
  Sampler sampler(params.sampling, prompt);
  IncrementalDecoder decoder(tokenizer);
  StopMatcher stops(params.stop);
  auto emit = [&](const std::string& text) {
    if (text.empty()) return;
    result.text += text;
    on_text(text);
  };
  result.finish_reason = "length";
  for (int64_t i = 0; i < max_tokens; ++i) {
    const DrawRequest draw = sampler.next_draw(logits.first_row(0) + logits.rows(0) - 1);
    DrawOutcome outcome = std::move(model.backend().sample(logits.device(), {&draw, 1}).front());
    if (!outcome.error.empty()) throw Error(outcome.error);
    const int32_t token = outcome.token.id;
    sampler.accept(token);
    result.tokens.push_back(token);
    if (std::find(params.end_tokens.begin(), params.end_tokens.end(), token) != params.end_tokens.end()) {
      result.finish_reason = "stop";
      break;
    }
    emit(stops.push(decoder.push(token)));
    if (stops.stopped()) {
      result.finish_reason = "stop";
      break;
    }
    if (i + 1 == max_tokens) break;
    BatchEntry entry{seq.get(), std::span(&result.tokens.back(), 1), LogitsFor::kLast};
    model.forward({&entry, 1}, logits);
  }
  if (!stops.stopped()) {
    std::string tail = stops.push(decoder.flush());
    if (stops.stopped())
      result.finish_reason = "stop";
    else
      tail += stops.flush();
    emit(tail);
  }
  result.decode_seconds = seconds_since(start);
  return result;
}

}  // namespace m1
