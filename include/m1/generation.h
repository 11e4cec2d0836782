#pragma once
// One sequence from prompt to finished text: chunked prefill, then sample, decode and stream
// until the end-of-turn token, a stop string, or the token budget.

#include <cstdint>
#include <filesystem>
#include <functional>
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

// on_text receives the text as it becomes final. With keep_prompt_logits, the logits of every
// prompt position are returned too.
GenerationResult generate(Model& model, const Tokenizer& tokenizer, std::span<const int32_t> prompt,
                          const GenerationParams& params, const std::function<void(std::string_view)>& on_text,
                          bool keep_prompt_logits = false);

}  // namespace m1
