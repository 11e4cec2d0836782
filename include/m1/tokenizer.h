#pragma once
// Hugging Face tokenizer.json byte-level BPE (the MiniMax-M1 tokenizer): encode, decode, and an
// incremental decoder for streaming.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace m1 {

// How added tokens (<end_of_sentence>, <think>, ...) written inside a text are treated.
enum class AddedTokens {
  kMatch,    // matched first and emitted as their ids, as Hugging Face does by default
  kLiteral,  // never matched: the text is encoded as ordinary bytes (untrusted user text)
};

class Tokenizer {
 public:
  // Throws m1::Error naming the file and the field at fault.
  static Tokenizer load(const std::filesystem::path& tokenizer_json);
  // `source` names the text in error messages.
  static Tokenizer from_json(std::string_view json_text, const std::string& source);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Never adds special tokens of its own (no BOS/EOS).
  std::vector<int32_t> encode(std::string_view text, AddedTokens added = AddedTokens::kMatch) const;
  // As kMatch, but an added token is matched only where `may_match(id, begin, end)` allows it
  // (its text is text[begin, end)); elsewhere its text is ordinary bytes. The text between the
  // matched tokens is encoded whole, as Hugging Face does.
  std::vector<int32_t> encode(std::string_view text,
                              const std::function<bool(int32_t id, size_t begin, size_t end)>& may_match) const;
  // Concatenated bytes of the tokens; added tokens decode to their text unless skip_special and
  // they are special. Invalid UTF-8 across the whole output is replaced with U+FFFD.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // The raw bytes one token stands for (may be part of a UTF-8 sequence). Throws on a bad id.
  const std::string& token_bytes(int32_t id) const;

  // Id of a token given its text (added tokens by content, vocabulary tokens by their byte-level
  // spelling as in tokenizer.json), if any.
  std::optional<int32_t> token_id(std::string_view token_text) const;
  bool is_special(int32_t id) const;  // an added token marked "special"
  bool is_added(int32_t id) const;    // any added token
  int32_t vocab_size() const;         // largest id + 1

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of token ids into text without ever emitting a broken UTF-8 sequence: bytes of
// an incomplete character are held back until it completes.
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special = false);
  // Text that became complete with this token (possibly empty).
  std::string push(int32_t id);
  // Whatever is held back, invalid sequences replaced with U+FFFD. Call at end of stream.
  std::string flush();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace m1
