#pragma once
// /tokenize and /detokenize, as vLLM's and llama.cpp's servers offer them: the tokens a prompt
// or a chat becomes, and the text token ids stand for.

#include <nlohmann/json.hpp>

#include "openai_request.h"

namespace m1::server {

// {"prompt": str} or {"messages": [...], "tools": [...], "add_generation_prompt": bool}
//   -> {"tokens": [...], "count": N, "max_model_len": N}. Throws ApiError.
nlohmann::ordered_json tokenize_json(const nlohmann::ordered_json& body, const ServedModel& model);

// {"tokens": [...]} -> {"prompt": str}. Throws ApiError.
nlohmann::ordered_json detokenize_json(const nlohmann::ordered_json& body, const ServedModel& model);

}  // namespace m1::server
