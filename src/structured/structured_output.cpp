#include "m1/structured_output.h"

#include <algorithm>

#include "m1/error.h"
#include "structured/matcher.h"
#include "structured/token_index.h"
#include "structured/token_mask.h"

namespace m1 {

TokenVocabulary::TokenVocabulary(const Tokenizer& tokenizer, int64_t rows)
    : tokenizer_(tokenizer), index_(std::make_unique<structured::TokenIndex>(tokenizer, rows)) {}

TokenVocabulary::~TokenVocabulary() = default;

int64_t TokenVocabulary::rows() const { return index_->rows(); }

GrammarMatcher::GrammarMatcher(std::shared_ptr<OutputGrammar> grammar, std::shared_ptr<const TokenVocabulary> vocabulary)
    : matcher_(std::make_unique<structured::Matcher>(std::move(grammar))), vocabulary_(std::move(vocabulary)) {}

GrammarMatcher::GrammarMatcher(GrammarMatcher&&) noexcept = default;
GrammarMatcher::~GrammarMatcher() = default;

bool GrammarMatcher::accept(int32_t token) {
  const Tokenizer& tokenizer = vocabulary_->tokenizer();
  if (token < 0 || token >= vocabulary_->rows() || token >= tokenizer.vocab_size() || tokenizer.is_special(token))
    return false;
  std::string bytes;
  try {
    bytes = tokenizer.token_bytes(token);
  } catch (const Error&) {
    return false;
  }
  if (tokenizer.is_added(token)) {
    for (const auto& [id, marker] : vocabulary_->index().markers())
      if (id == token) return matcher_->advance(structured::marker_symbol(marker));
    return false;
  }
  return !bytes.empty() && matcher_->advance_bytes(bytes);
}

void GrammarMatcher::fill_mask(std::span<uint32_t> allowed, std::span<const int32_t> end_tokens) {
  if (int64_t(allowed.size()) != vocabulary_->index().words())
    fail("grammar mask: {} words for {} tokens", allowed.size(), vocabulary_->rows());
  const bool same = last_state_ == matcher_->lexer_state() && last_generation_ == matcher_->generation() &&
                    last_started_ == matcher_->started() && std::ranges::equal(last_ends_, end_tokens);
  if (!same) {
    last_mask_.resize(allowed.size());
    structured::fill_token_mask(*matcher_, vocabulary_->index(), end_tokens, last_mask_);
    last_state_ = matcher_->lexer_state();
    last_generation_ = matcher_->generation();
    last_started_ = matcher_->started();
    last_ends_.assign(end_tokens.begin(), end_tokens.end());
  }
  std::ranges::copy(last_mask_, allowed.begin());
}

bool GrammarMatcher::can_end() { return matcher_->can_end(); }
bool GrammarMatcher::must_end() { return matcher_->must_end(); }

}  // namespace m1
