#include "m1/tokenizer.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "m1/error.h"

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const fs::path kSourceDir = M1_SOURCE_DIR;
const fs::path kRealTokenizer = kSourceDir / "data/minimax-m1/tokenizer.json";
const fs::path kTinyTokenizer = kSourceDir / "tests/data/golden/tiny-bf16/tokenizer.json";
const fs::path kOddTokenizer = kSourceDir / "tests/data/golden/odd-f32/tokenizer.json";

const m1::Tokenizer& real_tokenizer() {
  static const m1::Tokenizer tokenizer = m1::Tokenizer::load(kRealTokenizer);
  return tokenizer;
}

json read_json(const fs::path& path) {
  std::ifstream file(path);
  return json::parse(file);
}

// Independent of the tokenizer's own UTF-8 code, so the two can check each other.
bool is_valid_utf8(std::string_view text) {
  for (size_t i = 0; i < text.size();) {
    const auto lead = static_cast<uint8_t>(text[i]);
    const size_t length = lead < 0x80       ? 1
                          : lead >> 5 == 6  ? 2
                          : lead >> 4 == 14 ? 3
                          : lead >> 3 == 30 ? 4
                                            : 0;
    if (length == 0 || i + length > text.size()) return false;
    char32_t cp = length == 1 ? lead : lead & (0x7F >> length);
    for (size_t k = 1; k < length; ++k) {
      const auto byte = static_cast<uint8_t>(text[i + k]);
      if (byte >> 6 != 2) return false;
      cp = (cp << 6) | (byte & 0x3F);
    }
    constexpr char32_t kSmallest[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kSmallest[length] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += length;
  }
  return true;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | cp >> 6);
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | cp >> 12);
    out += static_cast<char>(0x80 | (cp >> 6 & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | cp >> 18);
    out += static_cast<char>(0x80 | (cp >> 12 & 0x3F));
    out += static_cast<char>(0x80 | (cp >> 6 & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Text built from chunks that stress different parts of the pre-tokenizer.
std::string random_text(std::mt19937& rng) {
  const auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  std::string text;
  const size_t chunks = 1 + pick(12);
  for (size_t c = 0; c < chunks; ++c) {
    const size_t length = 1 + pick(8);
    switch (pick(6)) {
      case 0:  // printable ASCII: words, digits, punctuation
        for (size_t i = 0; i < length; ++i) text += static_cast<char>(' ' + pick(95));
        break;
      case 1:  // whitespace runs, including non-ASCII spaces
        for (size_t i = 0; i < length; ++i) {
          constexpr char32_t kSpaces[] = {' ', '\t', '\v', '\f', 0xA0, 0x2003, 0x3000, 0x85};
          append_utf8(text, kSpaces[pick(std::size(kSpaces))]);
        }
        break;
      case 2:  // line breaks in every combination
        for (size_t i = 0; i < length; ++i) text += "\r\n "[pick(3)];
        break;
      case 3:  // any scalar value of the planes in use
        for (size_t i = 0; i < length; ++i) {
          constexpr char32_t kPlanes[] = {0, 0, 0, 1, 2, 3, 14, 15, 16};
          char32_t cp =
              kPlanes[pick(std::size(kPlanes))] << 16 | static_cast<char32_t>(pick(0x10000));
          if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;
          append_utf8(text, cp);
        }
        break;
      case 4:  // added tokens, whole or cut short
        text += std::array{"<think>", "</think>", "<end_of_sentence>", "<reserved_5", "<"}[pick(5)];
        break;
      default:  // letters with combining marks, and digits from other scripts
        for (size_t i = 0; i < length; ++i) {
          constexpr char32_t kLetters[] = {'a',   'Z',    0xE9,    0x301, 0x5D0,
                                           0x660, 0x4E2D, 0x1F600, 0x200D};
          append_utf8(text, kLetters[pick(std::size(kLetters))]);
        }
    }
  }
  return text;
}

// The id of the vocabulary token that is the single byte `byte`.
int32_t byte_token(const m1::Tokenizer& tokenizer, uint8_t byte) {
  for (int32_t id = 0; id < tokenizer.vocab_size(); ++id) {
    if (!tokenizer.is_added(id) &&
        tokenizer.token_bytes(id) == std::string(1, static_cast<char>(byte))) {
      return id;
    }
  }
  throw std::runtime_error("no token for a byte");
}

// ---------------------------------------------------------------------------------------------

TEST(Tokenizer, MatchesGoldenEncodings) {
  const json cases = read_json(kSourceDir / "tests/data/golden/tokenizer_m1.json");
  ASSERT_FALSE(cases.empty());
  for (const json& c : cases) {
    const std::string text = c["text"];
    const std::vector<int32_t> expected = c["ids"];
    EXPECT_EQ(real_tokenizer().encode(text), expected) << json(text).dump();
    EXPECT_EQ(real_tokenizer().decode(expected), text) << json(text).dump();
  }
}

TEST(Tokenizer, RoundTripsRandomText) {
  std::mt19937 rng(20240601);
  for (int i = 0; i < 3000; ++i) {
    const std::string text = random_text(rng);
    ASSERT_TRUE(is_valid_utf8(text));
    for (const m1::AddedTokens added : {m1::AddedTokens::kMatch, m1::AddedTokens::kLiteral}) {
      ASSERT_EQ(real_tokenizer().decode(real_tokenizer().encode(text, added)), text)
          << json(text).dump();
    }
  }
}

TEST(Tokenizer, RoundTripsLongRuns) {
  // Words of a quarter megabyte must not exhaust the regex engine's stack.
  for (const std::string_view unit : {"a", "A", " ", "\n", "7", "!", "é", "ab "}) {
    std::string text;
    while (text.size() < (1 << 18)) text += unit;
    ASSERT_EQ(real_tokenizer().decode(real_tokenizer().encode(text)), text) << unit;
  }
}

TEST(Tokenizer, EncodesInvalidUtf8ByteByByte) {
  const std::string text = "ab\xFF\xC3 caf\xC3\xA9\xE2\x82";
  std::string bytes;
  for (const int32_t id : real_tokenizer().encode(text)) bytes += real_tokenizer().token_bytes(id);
  EXPECT_EQ(bytes, text);
}

TEST(Tokenizer, MatchesAddedTokensOnlyWhenAsked) {
  const m1::Tokenizer& tokenizer = real_tokenizer();
  EXPECT_EQ(tokenizer.encode("x<reserved_5>y", m1::AddedTokens::kMatch),
            (std::vector<int32_t>{87, 200005, 88}));
  const std::vector<int32_t> literal =
      tokenizer.encode("x<reserved_5>y", m1::AddedTokens::kLiteral);
  EXPECT_GT(literal.size(), 3u);
  EXPECT_EQ(tokenizer.decode(literal), "x<reserved_5>y");
}

TEST(Tokenizer, LiteralTextNeverBecomesAddedTokens) {
  const m1::Tokenizer& tokenizer = real_tokenizer();
  const std::string text = "hi<end_of_sentence>\n<think>x</think><beginning_of_sentence>";
  const std::vector<int32_t> ids = tokenizer.encode(text, m1::AddedTokens::kLiteral);
  for (const int32_t id : ids) EXPECT_LT(id, 200000);
  EXPECT_EQ(tokenizer.decode(ids), text);
  const std::vector<int32_t> matched = tokenizer.encode(text);
  EXPECT_NE(std::find(matched.begin(), matched.end(), 200020), matched.end());
}

TEST(Tokenizer, DecodeReplacesInvalidUtf8AndSkipsSpecialTokens) {
  const m1::Tokenizer& tokenizer = real_tokenizer();
  const std::vector<int32_t> ids = {
      byte_token(tokenizer, 0xF0), byte_token(tokenizer, 0x9F), 200020,
      byte_token(tokenizer, 'A'),  byte_token(tokenizer, 0xFF), 200023};
  EXPECT_EQ(tokenizer.decode(ids), "\uFFFD<end_of_sentence>A\uFFFD<think>");
  EXPECT_EQ(tokenizer.decode(ids, /*skip_special=*/true), "\uFFFDA\uFFFD<think>");
}

TEST(Tokenizer, LooksUpTokens) {
  const m1::Tokenizer& tokenizer = real_tokenizer();
  EXPECT_EQ(tokenizer.vocab_size(), 200064);
  EXPECT_EQ(tokenizer.token_id("<end_of_sentence>"), 200020);
  EXPECT_EQ(tokenizer.token_id("<think>"), 200023);
  EXPECT_EQ(tokenizer.token_id("Ġt"), 257);  // the second merge, by its byte-level spelling
  EXPECT_EQ(tokenizer.token_id("no such token"), std::nullopt);
  EXPECT_TRUE(tokenizer.is_special(200020));
  EXPECT_FALSE(tokenizer.is_special(200023));
  EXPECT_TRUE(tokenizer.is_added(200023));
  EXPECT_FALSE(tokenizer.is_added(257));
  EXPECT_FALSE(tokenizer.is_special(-1));
  EXPECT_EQ(tokenizer.token_bytes(257), " t");
  EXPECT_EQ(tokenizer.token_bytes(200020), "<end_of_sentence>");
  EXPECT_THROW(tokenizer.token_bytes(200064), m1::Error);
  EXPECT_THROW(tokenizer.decode(std::vector<int32_t>{-1}), m1::Error);
}

TEST(Tokenizer, EncodesTheSameOnManyThreads) {
  std::mt19937 rng(7);
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back(random_text(rng));
  const m1::Tokenizer tokenizer = m1::Tokenizer::load(kRealTokenizer);  // a cold cache
  std::vector<std::vector<std::vector<int32_t>>> results(4);
  std::vector<std::thread> threads;
  for (auto& result : results) {
    threads.emplace_back([&] {
      for (const std::string& text : texts) result.push_back(tokenizer.encode(text));
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (size_t i = 0; i < texts.size(); ++i) {
    EXPECT_EQ(results[0][i], real_tokenizer().encode(texts[i]));
    for (const auto& result : results) EXPECT_EQ(result[i], results[0][i]);
  }
}

// ---------------------------------------------------------------------------------------------

TEST(IncrementalDecoder, HoldsBackASplitCharacter) {
  const m1::Tokenizer& tokenizer = real_tokenizer();
  m1::IncrementalDecoder decoder(tokenizer);
  const std::string robot = "\xF0\x9F\xA4\x96";
  for (size_t i = 0; i + 1 < robot.size(); ++i) {
    EXPECT_EQ(decoder.push(byte_token(tokenizer, robot[i])), "");
  }
  EXPECT_EQ(decoder.push(byte_token(tokenizer, robot.back())), robot);
  EXPECT_EQ(decoder.flush(), "");
}

TEST(IncrementalDecoder, ReplacesBrokenSequencesAsSoonAsKnown) {
  const m1::Tokenizer& tokenizer = real_tokenizer();
  m1::IncrementalDecoder decoder(tokenizer);
  EXPECT_EQ(decoder.push(byte_token(tokenizer, 0xE2)), "");
  EXPECT_EQ(decoder.push(byte_token(tokenizer, 'x')), "\uFFFDx");
  EXPECT_EQ(decoder.push(byte_token(tokenizer, 0xC0)), "\uFFFD");  // can never start a character
  EXPECT_EQ(decoder.push(byte_token(tokenizer, 0xF0)), "");
  EXPECT_EQ(decoder.flush(), "\uFFFD");
}

TEST(IncrementalDecoder, AgreesWithDecodeOnRandomIds) {
  const m1::Tokenizer& tokenizer = real_tokenizer();
  std::vector<int32_t> byte_ids;
  for (int byte = 0x80; byte <= 0xFF; ++byte) byte_ids.push_back(byte_token(tokenizer, byte));
  std::mt19937 rng(99);
  for (int round = 0; round < 2000; ++round) {
    std::vector<int32_t> ids;
    const size_t count = rng() % 12;
    for (size_t i = 0; i < count; ++i) {
      switch (rng() % 4) {
        case 0:
          ids.push_back(byte_ids[rng() % byte_ids.size()]);
          break;
        case 1:
          ids.push_back(200000 + static_cast<int32_t>(rng() % 64));
          break;
        default:
          ids.push_back(static_cast<int32_t>(rng() % 200000));
      }
    }
    for (const bool skip_special : {false, true}) {
      m1::IncrementalDecoder decoder(tokenizer, skip_special);
      std::string streamed;
      for (const int32_t id : ids) {
        const std::string piece = decoder.push(id);
        ASSERT_TRUE(is_valid_utf8(piece));
        streamed += piece;
      }
      const std::string rest = decoder.flush();
      ASSERT_TRUE(is_valid_utf8(rest));
      ASSERT_EQ(streamed + rest, tokenizer.decode(ids, skip_special)) << json(ids).dump();
    }
  }
}

// ---------------------------------------------------------------------------------------------

TEST(SmallTokenizers, LoadAndRoundTrip) {
  for (const fs::path& path : {kTinyTokenizer, kOddTokenizer}) {
    const m1::Tokenizer tokenizer = m1::Tokenizer::load(path);
    std::mt19937 rng(5);
    for (int i = 0; i < 300; ++i) {
      const std::string text = random_text(rng);
      ASSERT_EQ(tokenizer.decode(tokenizer.encode(text)), text) << path;
    }
    const std::vector<int32_t> ids = tokenizer.encode("a<end_of_sentence>");
    ASSERT_EQ(ids.size(), 2u);
    EXPECT_EQ(ids[1], tokenizer.token_id("<end_of_sentence>"));
    EXPECT_TRUE(tokenizer.is_special(ids[1]));
    EXPECT_EQ(tokenizer.decode(ids, /*skip_special=*/true), "a");
  }
  const m1::Tokenizer tiny = m1::Tokenizer::load(kTinyTokenizer);
  EXPECT_EQ(tiny.token_id("<end_of_sentence>"), 497);
  EXPECT_EQ(tiny.vocab_size(), 512);
}

TEST(SmallTokenizers, AcceptMergesWrittenAsStrings) {
  json file = read_json(kOddTokenizer);
  const m1::Tokenizer as_pairs = m1::Tokenizer::from_json(file.dump(), "pairs.json");
  for (json& merge : file["model"]["merges"])
    merge = merge[0].get<std::string>() + " " + merge[1].get<std::string>();
  const m1::Tokenizer as_strings = m1::Tokenizer::from_json(file.dump(), "strings.json");
  const std::string text = "the quick brown fox, and the other one; that is the thing";
  EXPECT_EQ(as_strings.encode(text), as_pairs.encode(text));
  EXPECT_LT(as_pairs.encode(text).size(), text.size());  // merges did apply
}

TEST(SmallTokenizers, MatchAddedTokensLeftmostThenLongest) {
  json file = read_json(kTinyTokenizer);
  const int32_t next_id = m1::Tokenizer::from_json(file.dump(), "tiny.json").vocab_size();
  const auto add = [&](const std::string& content, int32_t id) {
    file["added_tokens"].push_back({{"id", id}, {"content", content}, {"special", false}});
  };
  add("<x>", next_id);
  add("<x><y>", next_id + 1);
  add("é ü", next_id + 2);
  add("in",
      *m1::Tokenizer::from_json(file.dump(), "tiny.json").token_id("in"));  // its own vocabulary id
  const m1::Tokenizer tokenizer = m1::Tokenizer::from_json(file.dump(), "tiny.json");
  const std::vector<int32_t> ids = tokenizer.encode("<x><y><x>é ü");
  EXPECT_EQ(ids, (std::vector<int32_t>{next_id + 1, next_id, next_id + 2}));
  EXPECT_EQ(tokenizer.decode(ids), "<x><y><x>é ü");
  EXPECT_TRUE(tokenizer.is_added(*tokenizer.token_id("in")));
  EXPECT_EQ(tokenizer.encode("in"), (std::vector<int32_t>{*tokenizer.token_id("in")}));
}

// ---------------------------------------------------------------------------------------------

class MalformedTokenizer : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("m1_test_tokenizer_" + std::to_string(getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes `text` as `name` and expects loading it to fail naming the file and `field`.
  void expect_rejected(const std::string& name, const std::string& text, const std::string& field) {
    const fs::path path = dir_ / name;
    std::ofstream(path) << text;
    try {
      m1::Tokenizer::load(path);
      ADD_FAILURE() << name << " was accepted";
    } catch (const m1::Error& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find(path.string()), std::string::npos) << message;
      EXPECT_NE(message.find(field), std::string::npos) << message;
      EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    }
  }

  void expect_rejected(const std::string& name, const json& file, const std::string& field) {
    expect_rejected(name, file.dump(), field);
  }

  const json tiny_ = read_json(kTinyTokenizer);
  fs::path dir_;
};

TEST_F(MalformedTokenizer, MissingFile) {
  EXPECT_THROW(m1::Tokenizer::load(dir_ / "absent.json"), m1::Error);
}

TEST_F(MalformedTokenizer, NotJson) {
  expect_rejected("not_json.json", std::string("{\"model\": [1, 2"), "not valid JSON");
}

TEST_F(MalformedTokenizer, MissingModel) {
  json file = tiny_;
  file.erase("model");
  expect_rejected("no_model.json", file, "model");
}

TEST_F(MalformedTokenizer, VocabularyIdOutOfRange) {
  json file = tiny_;
  file["model"]["vocab"]["Ġt"] = 100000;
  expect_rejected("id_range.json", file, "model.vocab[\"Ġt\"]");
  file["model"]["vocab"]["Ġt"] = -1;
  expect_rejected("id_negative.json", file, "model.vocab[\"Ġt\"]");
}

TEST_F(MalformedTokenizer, VocabularyIdTwice) {
  json file = tiny_;
  file["model"]["vocab"]["Ġt"] = file["model"]["vocab"]["Ġa"];
  expect_rejected("id_twice.json", file, "model.vocab");
}

TEST_F(MalformedTokenizer, MergeOfUnknownSymbol) {
  json file = tiny_;
  file["model"]["merges"][3] = {"Ġ", "unknown"};
  expect_rejected("merge_unknown.json", file, "model.merges[3]");
  file["model"]["merges"][3] = "just-one-part";
  expect_rejected("merge_shape.json", file, "model.merges[3]");
}

TEST_F(MalformedTokenizer, AddedTokenWithBadId) {
  json file = tiny_;
  file["added_tokens"][2]["id"] = -5;
  expect_rejected("added_negative.json", file, "added_tokens[2].id");
  file["added_tokens"][2]["id"] = file["added_tokens"][1]["id"];
  expect_rejected("added_taken.json", file, "added_tokens[2].id");
  file["added_tokens"][2]["id"] = "seven";
  expect_rejected("added_string.json", file, "added_tokens[2].id");
}

TEST_F(MalformedTokenizer, BadRegex) {
  json file = tiny_;
  file["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  expect_rejected("bad_regex.json", file, "pre_tokenizer.pretokenizers[0].pattern.Regex");
  file["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "a*";
  expect_rejected("empty_regex.json", file, "pre_tokenizer.pretokenizers[0].pattern.Regex");
}

TEST_F(MalformedTokenizer, UnsupportedSettings) {
  json file = tiny_;
  file["model"]["type"] = "WordPiece";
  expect_rejected("model_type.json", file, "model.type");
  file = tiny_;
  file["normalizer"] = {{"type", "NFC"}};
  expect_rejected("normalizer.json", file, "normalizer");
  file = tiny_;
  file["pre_tokenizer"] = {{"type", "Whitespace"}};
  expect_rejected("pre_tokenizer.json", file, "pre_tokenizer");
  file = tiny_;
  file["pre_tokenizer"]["pretokenizers"][1]["use_regex"] = true;
  expect_rejected("byte_level_regex.json", file, "pre_tokenizer.pretokenizers[1].use_regex");
  file = tiny_;
  file["added_tokens"][0]["lstrip"] = true;
  expect_rejected("lstrip.json", file, "added_tokens[0].lstrip");
  file = tiny_;
  file["decoder"] = {{"type", "WordPiece"}};
  expect_rejected("decoder.json", file, "decoder");
}

}  // namespace
