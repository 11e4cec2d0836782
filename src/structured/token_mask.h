#pragma once
// The tokens a matcher accepts next, as a bitmask over the vocabulary: the text-class tokens
// its lexer state takes wholesale, then the rest tried through the tries, a refused prefix
// skipping all the tokens that share it.

#include <cstdint>
#include <span>

#include "structured/matcher.h"
#include "structured/token_index.h"

namespace m1::structured {

// Sets bit i of `allowed` (word i / 32) for every token i the matcher accepts next, and for the
// `end_tokens` when the output may end here; clears the others. `allowed` has index.words() words.
void fill_token_mask(Matcher& matcher, const TokenIndex& index, std::span<const int32_t> end_tokens,
                     std::span<uint32_t> allowed);

// Whether token `id` (not an end token) is accepted next; what fill_token_mask decides, one token
// at a time (the reference it is tested against).
bool token_allowed(Matcher& matcher, const Tokenizer& tokenizer, int32_t id);

}  // namespace m1::structured
