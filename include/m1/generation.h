#pragma once
// One sequence from prompt to finished text: chunked prefill, then sample, decode and stream
// until the end-of-turn token, a stop string, or the token budget.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "m1/model.h"
#include "m1/sampler.h"
#include "m1/tokenizer.h"

namespace m1 {

// The token that ends an assistant turn: tokenizer_config.json's eos_token when the model
// directory has one, else the added token <end_of_sentence>. Looked up by text, never by id.
int32_t end_of_turn_token(const std::filesystem::path& model_dir, const Tokenizer& tokenizer);

struct GenerationParams {
  SamplingParams sampling;
  int64_t max_tokens = 256;
  std::vector<std::string> stop;
  int64_t prefill_chunk = 512;  // prompt tokens per forward step
  std::vector<int32_t> end_tokens;
};

struct GenerationResult {
  std::vector<int32_t> tokens;  // generated, including a final end-of-turn token if one came
  std::string text;             // as streamed: stop strings and the end-of-turn token excluded
  std::string finish_reason;    // "stop" (end of turn or stop string) or "length"
  double prefill_seconds = 0, decode_seconds = 0;
  std::vector<float> prompt_logits;  // [prompt, vocab], only when asked for
};

// Reusing a prompt's state (m1-generate --prompt-cache): start from a state that has already
// consumed the prompt's first tokens, and be handed the state once the prefill reaches a point.
struct PromptReuse {
  std::unique_ptr<SequenceState> resume;  // has consumed the first resume->length() (< prompt) tokens; null: none
  int64_t snapshot_at = 0;                // a point where a prefill chunk may end (m1/prefill.h); 0: none
  std::function<void(const SequenceState&)> on_snapshot;
};

// on_text receives the text as it becomes final. With keep_prompt_logits, the logits of every
// prompt position consumed are returned too (those after a resumed state's).
GenerationResult generate(Model& model, const Tokenizer& tokenizer, std::span<const int32_t> prompt,
                          const GenerationParams& params, const std::function<void(std::string_view)>& on_text,
                          bool keep_prompt_logits = false, PromptReuse* reuse = nullptr);

}  // namespace m1
