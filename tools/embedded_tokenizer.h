#pragma once
// The real MiniMax-M1 tokenizer files (data/minimax-m1 of the source tree), built into m1-mkmodel so
// that a copied or installed binary needs nothing beside it.

#include <string_view>

namespace m1::tools {

std::string_view embedded_tokenizer_json();         // tokenizer.json
std::string_view embedded_tokenizer_config_json();  // tokenizer_config.json (the chat template)

}  // namespace m1::tools
