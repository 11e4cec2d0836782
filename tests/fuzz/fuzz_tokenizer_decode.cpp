// Fuzzes decoding with the real MiniMax-M1 tokenizer: arbitrary id sequences, special tokens kept
// or skipped. A sequence holding an id outside the vocabulary must be refused with m1::Error; any
// other must decode, and IncrementalDecoder, fed one id at a time, must stream the same text.
// Input, read from the end: one byte for skip_special, then three bytes an id.

#include <fuzzer/FuzzedDataProvider.h>

#include "fuzz_support.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  m1::fuzz::real_tokenizer();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const m1::Tokenizer& tokenizer = m1::fuzz::real_tokenizer();
  FuzzedDataProvider input(data, size);
  const bool skip_special = input.ConsumeBool();
  std::vector<int32_t> ids;
  bool in_vocabulary = true;
  while (input.remaining_bytes() > 0) {
    // The whole vocabulary and two ids past each end of it.
    ids.push_back(input.ConsumeIntegralInRange<int32_t>(-2, tokenizer.vocab_size() + 1));
    in_vocabulary = in_vocabulary && ids.back() >= 0 && ids.back() < tokenizer.vocab_size();
  }

  std::string text;
  const auto refused = m1::fuzz::m1_error_of([&] { text = tokenizer.decode(ids, skip_special); });
  m1::fuzz::check(refused.has_value() != in_vocabulary, "decode refuses exactly the ids outside the vocabulary");
  if (refused) return 0;
  m1::fuzz::must_not_throw([&] {
    m1::IncrementalDecoder stream(tokenizer, skip_special);
    std::string streamed;
    for (const int32_t id : ids) streamed += stream.push(id);
    streamed += stream.flush();
    m1::fuzz::check(streamed == text, "IncrementalDecoder streams what decode returns");
  });
  return 0;
}
