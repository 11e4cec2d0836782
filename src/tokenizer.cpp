#include "m1/tokenizer.h"

#include <algorithm>
#include <array>
#include <fstream>
#include <functional>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <utility>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <nlohmann/json.hpp>

#include "m1/error.h"

namespace m1 {
namespace {

using nlohmann::json;

constexpr std::string_view kReplacementCharacter = "\xEF\xBF\xBD";  // U+FFFD

// ---------------------------------------------------------------------------------------------
// UTF-8

enum class Utf8Status { kValid, kInvalid, kTruncated };

struct Utf8Step {
  Utf8Status status;
  size_t length;  // the character; the maximal invalid subpart; or all of a truncated tail
};

// Classifies the character at the start of non-empty `bytes`. Invalid input is measured in
// maximal subparts (Unicode's recommended practice, followed by Python and Rust), so that each
// one becomes a single U+FFFD.
Utf8Step next_utf8(std::string_view bytes) {
  const auto lead = static_cast<uint8_t>(bytes[0]);
  if (lead < 0x80) return {Utf8Status::kValid, 1};
  size_t length = 0;
  uint8_t low = 0x80;   // allowed range of the second byte, narrowed to rule out overlong
  uint8_t high = 0xBF;  // encodings, surrogates and code points above U+10FFFF
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;
    if (lead == 0xED) high = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;
  } else {
    return {Utf8Status::kInvalid, 1};
  }
  for (size_t i = 1; i < length; ++i) {
    if (i == bytes.size()) return {Utf8Status::kTruncated, i};
    const auto byte = static_cast<uint8_t>(bytes[i]);
    if (byte < low || byte > high) return {Utf8Status::kInvalid, i};
    low = 0x80;
    high = 0xBF;
  }
  return {Utf8Status::kValid, length};
}

// Appends `bytes` to `out` with each invalid sequence replaced by U+FFFD. A truncated sequence
// at the end is left unconsumed unless `at_end`. Returns how many bytes were consumed.
size_t append_valid_utf8(std::string& out, std::string_view bytes, bool at_end) {
  size_t valid_begin = 0;
  size_t pos = 0;
  while (pos < bytes.size()) {
    const Utf8Step step = next_utf8(bytes.substr(pos));
    if (step.status == Utf8Status::kValid) {
      pos += step.length;
      continue;
    }
    out.append(bytes.substr(valid_begin, pos - valid_begin));
    if (step.status == Utf8Status::kTruncated && !at_end) return pos;
    out.append(kReplacementCharacter);
    pos += step.length;
    valid_begin = pos;
  }
  out.append(bytes.substr(valid_begin));
  return pos;
}

// UTF-8 of a code point below U+0800, as all of the byte-level alphabet is.
void append_code_point(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// The code point of a valid UTF-8 character of `length` bytes.
char32_t decode_code_point(std::string_view character, size_t length) {
  constexpr std::array<uint8_t, 5> kLeadMask = {0, 0x7F, 0x1F, 0x0F, 0x07};
  char32_t cp = static_cast<uint8_t>(character[0]) & kLeadMask[length];
  for (size_t i = 1; i < length; ++i) cp = (cp << 6) | (static_cast<uint8_t>(character[i]) & 0x3F);
  return cp;
}

// ---------------------------------------------------------------------------------------------
// GPT-2's byte-level alphabet: vocabulary entries spell each byte as a printable code point.
// Printable Latin-1 bytes stand for themselves; the others move, in order, to U+0100 and up.

class ByteAlphabet {
 public:
  ByteAlphabet() {
    byte_of_.fill(-1);
    char32_t next_moved = 0x100;
    for (int byte = 0; byte < 256; ++byte) {
      const bool printable = (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) ||
                             (byte >= 0xAE && byte <= 0xFF);
      const char32_t cp = printable ? static_cast<char32_t>(byte) : next_moved++;
      append_code_point(spelling_[byte], cp);
      byte_of_[cp] = static_cast<int16_t>(byte);
    }
  }

  const std::string& spelling(uint8_t byte) const { return spelling_[byte]; }

  // The bytes a vocabulary entry stands for. An entry using a code point outside the alphabet
  // stands for its own UTF-8, as in Hugging Face's ByteLevel decoder.
  std::string bytes_of(std::string_view spelling) const {
    std::string bytes;
    for (size_t pos = 0; pos < spelling.size();) {
      const size_t length = next_utf8(spelling.substr(pos)).length;
      const char32_t cp = decode_code_point(spelling.substr(pos), length);
      if (cp >= byte_of_.size() || byte_of_[cp] < 0) return std::string(spelling);
      bytes.push_back(static_cast<char>(byte_of_[cp]));
      pos += length;
    }
    return bytes;
  }

 private:
  std::array<std::string, 256> spelling_;
  std::array<int16_t, 0x100 + 68> byte_of_;  // 68 bytes are moved above U+00FF
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// ---------------------------------------------------------------------------------------------
// Lookup tables

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view text) const { return std::hash<std::string_view>{}(text); }
};

template <class Value>
using StringMap = std::unordered_map<std::string, Value, StringHash, std::equal_to<>>;

struct Merge {
  int32_t rank;    // lower merges first
  int32_t merged;  // id of the joined symbol
};

// Open-addressing map from a pair of symbol ids to their merge: BPE's innermost lookup.
class MergeTable {
 public:
  void reserve(size_t count) {
    int bits = 4;
    while ((size_t{1} << bits) < 2 * count) ++bits;
    slots_.assign(size_t{1} << bits, Slot{kEmpty, {}});
    shift_ = 64 - bits;
  }

  // A repeated pair keeps its last rank, as Hugging Face's merge map does.
  void insert(int32_t left, int32_t right, Merge merge) {
    const uint64_t k = key(left, right);
    slots_[slot_index(k)] = Slot{k, merge};
  }

  const Merge* find(int32_t left, int32_t right) const {
    const Slot& slot = slots_[slot_index(key(left, right))];
    return slot.key == kEmpty ? nullptr : &slot.merge;
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};  // ids are non-negative, so never a key
  struct Slot {
    uint64_t key;
    Merge merge;
  };

  static uint64_t key(int32_t left, int32_t right) {
    return (uint64_t{static_cast<uint32_t>(left)} << 32) | static_cast<uint32_t>(right);
  }

  // The slot holding `k`, or the empty slot where it would go.
  size_t slot_index(uint64_t k) const {
    const size_t mask = slots_.size() - 1;
    size_t index = (k * 0x9E3779B97F4A7C15ull) >> shift_;  // Fibonacci hashing
    while (slots_[index].key != kEmpty && slots_[index].key != k) index = (index + 1) & mask;
    return index;
  }

  std::vector<Slot> slots_;
  int shift_ = 64;
};

// ---------------------------------------------------------------------------------------------
// Byte-pair encoding of one pre-token word

class BytePairEncoder {
 public:
  BytePairEncoder() = default;
  BytePairEncoder(std::array<int32_t, 256> byte_ids, MergeTable merges)
      : byte_ids_(byte_ids), merges_(std::move(merges)) {}

  // Hugging Face's algorithm: starting from one symbol per byte, repeatedly apply the
  // lowest-ranked merge available (leftmost on ties) until none applies.
  void encode(std::string_view word, std::vector<int32_t>& out) const {
    if (word.empty()) return;
    // Reused across words to spare allocations, but not grown for rare huge words and then kept.
    thread_local Workspace reused;
    Workspace huge;
    Workspace& work = word.size() <= kReusedWorkspaceBytes ? reused : huge;
    work.symbols.clear();
    work.candidates.clear();
    const auto count = static_cast<int32_t>(word.size());
    for (int32_t i = 0; i < count; ++i) {
      work.symbols.push_back(
          {byte_ids_[static_cast<uint8_t>(word[i])], i - 1, i + 1 < count ? i + 1 : -1});
    }
    for (int32_t i = 0; i + 1 < count; ++i) add_candidate(work, i);
    while (!work.candidates.empty()) {
      std::pop_heap(work.candidates.begin(), work.candidates.end(), Candidate::after);
      const Candidate candidate = work.candidates.back();
      work.candidates.pop_back();
      if (still_applies(work, candidate)) apply(work, candidate);
    }
    // The first symbol is never merged away: merges keep the left symbol.
    for (int32_t i = 0; i >= 0; i = work.symbols[i].next) out.push_back(work.symbols[i].id);
  }

 private:
  static constexpr int32_t kMergedAway = -1;
  static constexpr size_t kReusedWorkspaceBytes = 4096;

  struct Symbol {
    int32_t id;
    int32_t prev;  // index of the neighbouring live symbols, -1 at the ends
    int32_t next;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;  // index of the left symbol
    int32_t left;
    int32_t right;
    int32_t merged;
    static bool after(const Candidate& a, const Candidate& b) {
      return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
    }
  };
  struct Workspace {
    std::vector<Symbol> symbols;
    std::vector<Candidate> candidates;  // a min-heap by (rank, pos)
  };

  void add_candidate(Workspace& work, int32_t pos) const {
    const Symbol& left = work.symbols[pos];
    const int32_t right = work.symbols[left.next].id;
    if (const Merge* merge = merges_.find(left.id, right)) {
      work.candidates.push_back({merge->rank, pos, left.id, right, merge->merged});
      std::push_heap(work.candidates.begin(), work.candidates.end(), Candidate::after);
    }
  }

  // A queued merge is stale once either of its symbols has changed.
  static bool still_applies(const Workspace& work, const Candidate& candidate) {
    const Symbol& left = work.symbols[candidate.pos];
    return left.id == candidate.left && left.next >= 0 &&
           work.symbols[left.next].id == candidate.right;
  }

  void apply(Workspace& work, const Candidate& candidate) const {
    Symbol& left = work.symbols[candidate.pos];
    Symbol& right = work.symbols[left.next];
    left.id = candidate.merged;
    right.id = kMergedAway;
    left.next = right.next;
    if (left.next >= 0) work.symbols[left.next].prev = candidate.pos;
    if (left.prev >= 0) add_candidate(work, left.prev);
    if (left.next >= 0) add_candidate(work, candidate.pos);
  }

  std::array<int32_t, 256> byte_ids_{};
  MergeTable merges_;
};

// Recently encoded pre-token words and their ids: text repeats its words, so most lookups hit.
// A fixed table of entries one cache line long, each word in the one slot its hash picks, so a
// lookup costs one memory access and a new word simply replaces the old one in its slot.
class WordCache {
 public:
  WordCache() : entries_(kEntries) {}

  bool append_ids(std::string_view word, std::vector<int32_t>& out) {
    if (word.size() > kMaxWordBytes) return false;
    std::lock_guard lock(mutex_);
    const Entry& entry = entries_[slot(word)];
    if (std::string_view(entry.word, entry.word_length) != word) return false;
    out.insert(out.end(), entry.ids, entry.ids + entry.id_count);
    return true;
  }

  void insert(std::string_view word, std::span<const int32_t> ids) {
    if (word.size() > kMaxWordBytes || ids.size() > kMaxIds) return;
    std::lock_guard lock(mutex_);
    Entry& entry = entries_[slot(word)];
    entry.word_length = static_cast<uint8_t>(word.size());
    entry.id_count = static_cast<uint8_t>(ids.size());
    std::copy(word.begin(), word.end(), entry.word);
    std::copy(ids.begin(), ids.end(), entry.ids);
  }

 private:
  // Nearly all words of prose fit; the rest are encoded afresh each time.
  static constexpr size_t kMaxWordBytes = 30;
  static constexpr size_t kMaxIds = 8;
  static constexpr size_t kEntries = size_t{1} << 16;  // 4 MiB

  struct alignas(64) Entry {
    uint8_t word_length = 0;
    uint8_t id_count = 0;
    char word[kMaxWordBytes];
    int32_t ids[kMaxIds];
  };

  static size_t slot(std::string_view word) {
    return std::hash<std::string_view>{}(word) & (kEntries - 1);
  }

  std::mutex mutex_;  // encode may run on several threads at once
  std::vector<Entry> entries_;
};

// ---------------------------------------------------------------------------------------------
// The pre-tokenizer's Split(Regex, Isolated): matches and the gaps between them become words.

struct CodeDeleter {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};
using MatchData = std::unique_ptr<pcre2_match_data, MatchDataDeleter>;

std::string pcre2_message(int code) {
  std::array<PCRE2_UCHAR, 256> buffer{};
  pcre2_get_error_message(code, buffer.data(), buffer.size());
  return reinterpret_cast<const char*>(buffer.data());
}

class RegexSplitter {
 public:
  RegexSplitter() = default;

  // Throws a plain message; the caller adds where the pattern came from. Invalid UTF-8 in the
  // text is allowed: it matches nothing, so it ends up in gaps, encoded byte by byte.
  explicit RegexSplitter(const std::string& pattern) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    code_.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                              PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &offset,
                              nullptr));
    if (!code_) fail("{} at offset {}", pcre2_message(error), offset);
    uint32_t min_length = 0;
    pcre2_pattern_info(code_.get(), PCRE2_INFO_MINLENGTH, &min_length);
    if (min_length == 0) fail("may match the empty string, which is not supported");
    jit_ = pcre2_jit_compile(code_.get(), PCRE2_JIT_COMPLETE) == 0;
  }

  MatchData new_match_data() const {
    return MatchData(pcre2_match_data_create_from_pattern(code_.get(), nullptr));
  }

  template <class OnWord>
  void split(std::string_view text, pcre2_match_data* match_data, OnWord&& on_word) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    const PCRE2_SIZE* match = pcre2_get_ovector_pointer(match_data);
    size_t pos = 0;
    while (pos < text.size()) {
      const int rc =
          jit_ ? pcre2_jit_match(code_.get(), subject, text.size(), pos, 0, match_data, nullptr)
               : pcre2_match(code_.get(), subject, text.size(), pos, 0, match_data, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) fail("pre-tokenizer regex failed: {}", pcre2_message(rc));
      if (match[0] > pos) on_word(text.substr(pos, match[0] - pos));
      on_word(text.substr(match[0], match[1] - match[0]));
      pos = match[1];
    }
    if (pos < text.size()) on_word(text.substr(pos));
  }

 private:
  std::unique_ptr<pcre2_code, CodeDeleter> code_;
  bool jit_ = false;
};

// ---------------------------------------------------------------------------------------------
// Added tokens written in the text, found leftmost first and longest at a position.

class AddedTokenMatcher {
 public:
  struct Token {
    std::string content;  // not empty
    int32_t id;
  };

  AddedTokenMatcher() = default;
  explicit AddedTokenMatcher(std::vector<Token> tokens) {
    for (Token& token : tokens)
      by_first_byte_[static_cast<uint8_t>(token.content[0])].push_back(std::move(token));
    for (std::vector<Token>& group : by_first_byte_) {
      std::stable_sort(group.begin(), group.end(), [](const Token& a, const Token& b) {
        return a.content.size() > b.content.size();
      });
    }
  }

  // Calls on_text for the text between added tokens and on_token for each added token;
  // may_match(id, begin, end) says whether a token found at [begin, end) counts.
  template <class OnText, class OnToken, class MayMatch>
  void split(std::string_view text, OnText&& on_text, OnToken&& on_token, MayMatch&& may_match) const {
    size_t text_begin = 0;
    for (size_t pos = 0; pos < text.size(); ++pos) {
      const Token* token = longest_at(text, pos, may_match);
      if (!token) continue;
      if (pos > text_begin) on_text(text.substr(text_begin, pos - text_begin));
      on_token(token->id);
      text_begin = pos + token->content.size();
      pos = text_begin - 1;
    }
    if (text_begin < text.size()) on_text(text.substr(text_begin));
  }

 private:
  template <class MayMatch>
  const Token* longest_at(std::string_view text, size_t pos, MayMatch&& may_match) const {
    for (const Token& token : by_first_byte_[static_cast<uint8_t>(text[pos])]) {
      if (text.substr(pos).starts_with(token.content) && may_match(token.id, pos, pos + token.content.size()))
        return &token;
    }
    return nullptr;
  }

  std::array<std::vector<Token>, 256> by_first_byte_;  // each longest first
};

// ---------------------------------------------------------------------------------------------
// Reading tokenizer.json

std::string field_name(std::string_view parent, std::string_view key) {
  return parent.empty() ? std::string(key) : fmt::format("{}.{}", parent, key);
}

// Where values came from, for error messages that name the file and the field at fault.
struct Source {
  const std::string& name;

  [[noreturn]] void fail(std::string_view field, std::string_view problem) const {
    if (field.empty()) m1::fail("{}: {}", name, problem);
    m1::fail("{}: {}: {}", name, field, problem);
  }

  const json& member(const json& object, std::string_view parent, const char* key) const {
    const auto found = object.find(key);  // end() for a non-object too
    if (found == object.end()) fail(field_name(parent, key), "missing");
    return *found;
  }

  // A setting that must have this value for the tokenizer to work as this code does.
  void require(const json& object, std::string_view parent, const char* key,
               const json& expected) const {
    const json& value = member(object, parent, key);
    if (value != expected) unsupported(parent, key, value, expected);
  }

  // The same, for a setting whose default (when absent or null) is the expected value.
  void require_if_set(const json& object, std::string_view parent, const char* key,
                      const json& expected) const {
    const auto found = object.find(key);
    if (found != object.end() && !found->is_null() && *found != expected) {
      unsupported(parent, key, *found, expected);
    }
  }

  [[noreturn]] void unsupported(std::string_view parent, std::string_view key, const json& value,
                                const json& expected) const {
    fail(field_name(parent, key),
         fmt::format("{} is not supported (only {})", value.dump(), expected.dump()));
  }
};

// model.vocab and model.merges are nearly all of tokenizer.json (7.5 MB for MiniMax-M1). Storing
// them as JSON objects would double the load time, so the parser hands their entries over as they
// are read and leaves them out of the document, where they remain as an empty object and array.
class LargeSections {
 public:
  std::vector<std::pair<std::string, json>> vocab;  // spelling, id; null if the id was not a scalar
  std::vector<json> merges;

  // A nlohmann::json parser callback; returns whether to keep the value in the document.
  bool operator()(int depth, json::parse_event_t event, json& parsed) {
    using Event = json::parse_event_t;
    if (depth == 1 && event == Event::key) {
      in_model_ = parsed == "model";
      key_.clear();
    }
    if (depth == 2 && event == Event::key)
      key_ = in_model_ ? parsed.get<std::string>() : std::string();
    if (depth == 2 && event == Event::object_start) section_ = key_ == "vocab" ? kVocab : kNone;
    if (depth == 2 && event == Event::array_start) section_ = key_ == "merges" ? kMerges : kNone;
    if (depth == 2 && (event == Event::object_end || event == Event::array_end)) section_ = kNone;
    if (depth != 3 || section_ == kNone || event == Event::object_start ||
        event == Event::array_start) {
      return true;
    }
    if (section_ == kMerges) {
      merges.push_back(std::move(parsed));
    } else if (event == Event::key) {
      vocab.emplace_back(std::move(parsed.get_ref<std::string&>()), nullptr);
    } else {
      vocab.back().second = std::move(parsed);
    }
    return false;
  }

 private:
  enum Section { kNone, kVocab, kMerges };
  bool in_model_ = false;  // inside the root's "model" member
  std::string key_;        // the current key of "model"
  Section section_ = kNone;
};

std::string read_file(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) fail("{}: cannot open the tokenizer file", path.string());
  std::ostringstream text;
  text << file.rdbuf();
  if (!file) fail("{}: cannot read the tokenizer file", path.string());
  return std::move(text).str();
}

std::string type_of(const json& step) {
  const auto type = step.find("type");
  return type != step.end() && type->is_string() ? type->get<std::string>() : std::string();
}

// The split regex of the one pre-tokenizer supported:
// Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)].
std::string split_pattern(const json& root, const Source& source) {
  const json& pre = source.member(root, "", "pre_tokenizer");
  if (type_of(pre) != "Sequence")
    source.fail("pre_tokenizer", "only Sequence[Split, ByteLevel] is supported");
  const json& steps = source.member(pre, "pre_tokenizer", "pretokenizers");
  if (!steps.is_array() || steps.size() != 2 || type_of(steps[0]) != "Split" ||
      type_of(steps[1]) != "ByteLevel") {
    source.fail("pre_tokenizer.pretokenizers", "only [Split, ByteLevel] is supported");
  }
  constexpr std::string_view kSplit = "pre_tokenizer.pretokenizers[0]";
  constexpr std::string_view kByteLevel = "pre_tokenizer.pretokenizers[1]";
  source.require(steps[0], kSplit, "behavior", "Isolated");
  source.require_if_set(steps[0], kSplit, "invert", false);
  source.require(steps[1], kByteLevel, "use_regex", false);  // both default to true
  source.require(steps[1], kByteLevel, "add_prefix_space", false);
  const json& pattern = source.member(steps[0], kSplit, "pattern");
  const json& regex = source.member(pattern, "pre_tokenizer.pretokenizers[0].pattern", "Regex");
  if (!regex.is_string())
    source.fail("pre_tokenizer.pretokenizers[0].pattern.Regex", "expected a string");
  return regex.get<std::string>();
}

// Rejects settings that would make Hugging Face tokenize or decode differently from this code.
// The post-processor is not checked: it only adds special tokens, which encode never does.
void check_supported(const json& root, const Source& source) {
  if (!root.is_object()) source.fail("", "expected a JSON object");
  source.require_if_set(root, "", "normalizer", nullptr);
  if (type_of(source.member(root, "", "decoder")) != "ByteLevel") {
    source.fail("decoder", "only the ByteLevel decoder is supported");
  }
  const json& model = source.member(root, "", "model");
  source.require_if_set(model, "model", "type", "BPE");
  source.require_if_set(model, "model", "dropout", 0.0);
  source.require_if_set(model, "model", "continuing_subword_prefix", "");
  source.require_if_set(model, "model", "end_of_word_suffix", "");
  source.require_if_set(model, "model", "ignore_merges", false);
}

// The id `value` holds, if it is an integer in [0, limit).
std::optional<int32_t> id_below(const json& value, size_t limit) {
  if (!value.is_number_integer()) return std::nullopt;
  const auto id = value.get<int64_t>();
  if (id < 0 || static_cast<uint64_t>(id) >= limit) return std::nullopt;
  return static_cast<int32_t>(id);
}

std::string bad_id(const json& value, size_t limit) {
  if (!value.is_number_integer()) return fmt::format("id {} is not an integer", value.dump());
  return fmt::format("id {} is out of range [0, {})", value.dump(), limit);
}

// A merge is ["left", "right"] or, in older files, "left right".
std::optional<std::pair<std::string, std::string>> merge_pair(const json& merge) {
  if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
    return std::pair(merge[0].get<std::string>(), merge[1].get<std::string>());
  }
  if (!merge.is_string()) return std::nullopt;
  const std::string& text = merge.get_ref<const std::string&>();
  const size_t space = text.find(' ');
  if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
    return std::nullopt;
  return std::pair(text.substr(0, space), text.substr(space + 1));
}

enum class TokenKind : uint8_t { kUnused, kVocabulary, kAdded, kSpecial };

}  // namespace

// ---------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::vector<std::string> token_bytes;  // by id; an added token holds its content
  std::vector<TokenKind> kinds;          // by id
  StringMap<int32_t> vocabulary_ids;     // by byte-level spelling
  StringMap<int32_t> added_ids;          // by content
  BytePairEncoder bpe;
  RegexSplitter splitter;
  AddedTokenMatcher added_tokens;
  mutable WordCache cache;  // encode is const: the cache is not part of the tokenizer's value

  void load_vocabulary(const json& model,
                       const std::vector<std::pair<std::string, json>>& vocabulary,
                       const Source& source);
  void load_merges(const json& model, const std::vector<json>& merges, const Source& source);
  void load_added_tokens(const json& root, const Source& source);
  AddedTokenMatcher::Token load_added_token(const json& token, const std::string& field,
                                            size_t id_limit, const Source& source);
  std::optional<int32_t> vocabulary_id(std::string_view spelling) const;
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::load_vocabulary(const json& model,
                                      const std::vector<std::pair<std::string, json>>& vocabulary,
                                      const Source& source) {
  if (!source.member(model, "model", "vocab").is_object())
    source.fail("model.vocab", "expected an object");
  token_bytes.resize(vocabulary.size());
  kinds.assign(vocabulary.size(), TokenKind::kUnused);
  vocabulary_ids.reserve(vocabulary.size());
  for (const auto& entry : vocabulary) {
    const std::string& spelling = entry.first;  // not a structured binding: clang 14 cannot capture those
    const std::optional<int32_t> id = id_below(entry.second, vocabulary.size());
    const auto fail_here = [&](std::string_view problem) {
      source.fail(fmt::format("model.vocab[{}]", json(spelling).dump()), problem);
    };
    if (!id) fail_here(bad_id(entry.second, vocabulary.size()));
    if (kinds[*id] != TokenKind::kUnused) fail_here(fmt::format("id {} is used twice", *id));
    if (!vocabulary_ids.emplace(spelling, *id).second) fail_here("the token appears twice");
    kinds[*id] = TokenKind::kVocabulary;
    token_bytes[*id] = byte_alphabet().bytes_of(spelling);
  }
}

void Tokenizer::Impl::load_merges(const json& model, const std::vector<json>& merges,
                                  const Source& source) {
  std::array<int32_t, 256> byte_ids{};
  for (int byte = 0; byte < 256; ++byte) {
    const auto id = vocabulary_id(byte_alphabet().spelling(static_cast<uint8_t>(byte)));
    if (!id) source.fail("model.vocab", fmt::format("lacks the symbol of byte 0x{:02X}", byte));
    byte_ids[byte] = *id;
  }
  if (!source.member(model, "model", "merges").is_array())
    source.fail("model.merges", "expected an array");
  MergeTable table;
  table.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto fail_here = [&](std::string_view problem) {
      source.fail(fmt::format("model.merges[{}]", rank), problem);
    };
    const auto pair = merge_pair(merges[rank]);
    if (!pair)
      fail_here(fmt::format("expected [\"left\", \"right\"] or \"left right\", not {}",
                            merges[rank].dump()));
    const auto require_id = [&](const std::string& spelling) {
      const auto id = vocabulary_id(spelling);
      if (!id) fail_here(fmt::format("symbol {} is not in model.vocab", json(spelling).dump()));
      return *id;
    };
    const int32_t left = require_id(pair->first);
    const int32_t right = require_id(pair->second);
    const int32_t merged = require_id(pair->first + pair->second);
    table.insert(left, right, Merge{static_cast<int32_t>(rank), merged});
  }
  bpe = BytePairEncoder(byte_ids, std::move(table));
}

void Tokenizer::Impl::load_added_tokens(const json& root, const Source& source) {
  const auto tokens = root.find("added_tokens");
  if (tokens == root.end() || tokens->is_null()) return;
  if (!tokens->is_array()) source.fail("added_tokens", "expected an array");
  // Ids stay dense: an added token's id is below the number of tokens in the file.
  const size_t id_limit = kinds.size() + tokens->size();
  std::vector<AddedTokenMatcher::Token> loaded;
  for (size_t i = 0; i < tokens->size(); ++i) {
    loaded.push_back(
        load_added_token((*tokens)[i], fmt::format("added_tokens[{}]", i), id_limit, source));
  }
  added_tokens = AddedTokenMatcher(std::move(loaded));
}

AddedTokenMatcher::Token Tokenizer::Impl::load_added_token(const json& token,
                                                           const std::string& field,
                                                           size_t id_limit, const Source& source) {
  const json& content_value = source.member(token, field, "content");
  if (!content_value.is_string() || content_value.get_ref<const std::string&>().empty()) {
    source.fail(field_name(field, "content"), "expected a non-empty string");
  }
  const std::string& content = content_value.get_ref<const std::string&>();
  const json& id_value = source.member(token, field, "id");
  const std::optional<int32_t> id = id_below(id_value, id_limit);
  if (!id) source.fail(field_name(field, "id"), bad_id(id_value, id_limit));
  for (const char* flag : {"lstrip", "rstrip", "single_word"})
    source.require_if_set(token, field, flag, false);
  const json special = token.value("special", json(false));
  if (!special.is_boolean()) source.fail(field_name(field, "special"), "expected true or false");

  if (static_cast<size_t>(*id) >= kinds.size()) {
    kinds.resize(*id + 1, TokenKind::kUnused);
    token_bytes.resize(*id + 1);
  }
  // An added token may take the vocabulary id of the same text, as GPT-2's <|endoftext|> does.
  const bool own_vocabulary_id =
      kinds[*id] == TokenKind::kVocabulary && token_bytes[*id] == content;
  if (kinds[*id] != TokenKind::kUnused && !own_vocabulary_id) {
    source.fail(field_name(field, "id"), fmt::format("id {} is already taken", *id));
  }
  if (!added_ids.emplace(content, *id).second) {
    source.fail(field_name(field, "content"),
                fmt::format("{} is added twice", json(content).dump()));
  }
  kinds[*id] = special.get<bool>() ? TokenKind::kSpecial : TokenKind::kAdded;
  token_bytes[*id] = content;
  return {content, *id};
}

std::optional<int32_t> Tokenizer::Impl::vocabulary_id(std::string_view spelling) const {
  const auto found = vocabulary_ids.find(spelling);
  if (found == vocabulary_ids.end()) return std::nullopt;
  return found->second;
}

void Tokenizer::Impl::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (cache.append_ids(word, out)) return;
  const size_t begin = out.size();
  bpe.encode(word, out);
  cache.insert(word, std::span(out).subspan(begin));
}

// ---------------------------------------------------------------------------------------------

Tokenizer Tokenizer::load(const std::filesystem::path& tokenizer_json) {
  return from_json(read_file(tokenizer_json), tokenizer_json.string());
}

Tokenizer Tokenizer::from_json(std::string_view json_text, const std::string& source_name) {
  const Source source{source_name};
  json root;
  LargeSections sections;
  try {
    root = json::parse(json_text, std::ref(sections));
  } catch (const json::parse_error& e) {
    source.fail("", fmt::format("not valid JSON: {}", e.what()));
  }
  check_supported(root, source);
  auto impl = std::make_unique<Impl>();
  const std::string pattern = split_pattern(root, source);
  try {
    impl->splitter = RegexSplitter(pattern);
  } catch (const Error& e) {
    source.fail("pre_tokenizer.pretokenizers[0].pattern.Regex", e.what());
  }
  const json& model = root.at("model");
  impl->load_vocabulary(model, sections.vocab, source);
  impl->load_merges(model, sections.merges, source);
  impl->load_added_tokens(root, source);
  return Tokenizer(std::move(impl));
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text, AddedTokens added) const {
  const bool match = added == AddedTokens::kMatch;
  return encode(text, [match](int32_t, size_t, size_t) { return match; });
}

std::vector<int32_t> Tokenizer::encode(std::string_view text,
                                       const std::function<bool(int32_t, size_t, size_t)>& may_match) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 4 + 1);
  const MatchData match_data = impl_->splitter.new_match_data();
  const auto encode_text = [&](std::string_view segment) {
    impl_->splitter.split(segment, match_data.get(),
                          [&](std::string_view word) { impl_->encode_word(word, ids); });
  };
  impl_->added_tokens.split(text, encode_text, [&](int32_t id) { ids.push_back(id); }, may_match);
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  for (const int32_t id : ids) {
    if (!(skip_special && is_special(id))) bytes += token_bytes(id);
  }
  std::string text;
  text.reserve(bytes.size());
  append_valid_utf8(text, bytes, /*at_end=*/true);
  return text;
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= vocab_size() || impl_->kinds[id] == TokenKind::kUnused) {
    fail("token id {} is not in the vocabulary (size {})", id, vocab_size());
  }
  return impl_->token_bytes[id];
}

std::optional<int32_t> Tokenizer::token_id(std::string_view token_text) const {
  const auto added = impl_->added_ids.find(token_text);
  if (added != impl_->added_ids.end()) return added->second;
  return impl_->vocabulary_id(token_text);
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->kinds[id] == TokenKind::kSpecial;
}

bool Tokenizer::is_added(int32_t id) const {
  return id >= 0 && id < vocab_size() &&
         (impl_->kinds[id] == TokenKind::kAdded || impl_->kinds[id] == TokenKind::kSpecial);
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->kinds.size()); }

// ---------------------------------------------------------------------------------------------

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special)
    : tokenizer_(&tokenizer), skip_special_(skip_special) {}

std::string IncrementalDecoder::push(int32_t id) {
  if (!(skip_special_ && tokenizer_->is_special(id))) pending_ += tokenizer_->token_bytes(id);
  std::string text;
  pending_.erase(0, append_valid_utf8(text, pending_, /*at_end=*/false));
  return text;
}

std::string IncrementalDecoder::flush() {
  std::string text;
  append_valid_utf8(text, pending_, /*at_end=*/true);
  pending_.clear();
  return text;
}

}  // namespace m1
