#include "m1/stop.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace m1 {
namespace {

// What push() returned for each piece, and what flush() returned at the end.
struct Streamed {
  std::vector<std::string> pushed;
  std::string flushed;
};

Streamed stream(StopMatcher& matcher, const std::vector<std::string>& pieces) {
  Streamed result;
  for (const std::string& piece : pieces) result.pushed.push_back(matcher.push(piece));
  result.flushed = matcher.flush();
  return result;
}

using Pieces = std::vector<std::string>;

TEST(StopMatcher, StopInsideOnePiece) {
  StopMatcher matcher({"END"});
  const Streamed out = stream(matcher, {"hello END world", "more"});
  EXPECT_EQ(out.pushed, (Pieces{"hello ", ""}));
  EXPECT_EQ(out.flushed, "");
  EXPECT_TRUE(matcher.stopped());
  EXPECT_EQ(matcher.matched(), "END");
}

TEST(StopMatcher, StopSplitAcrossTwoPieces) {
  StopMatcher matcher({"END"});
  EXPECT_EQ(stream(matcher, {"hello EN", "D tail"}).pushed, (Pieces{"hello ", ""}));
  EXPECT_TRUE(matcher.stopped());
}

TEST(StopMatcher, StopSplitAcrossThreePieces) {
  StopMatcher matcher({"<|end|>"});
  EXPECT_EQ(stream(matcher, {"x<|e", "nd", "|>y"}).pushed, (Pieces{"x", "", ""}));
  EXPECT_TRUE(matcher.stopped());
  EXPECT_EQ(matcher.matched(), "<|end|>");
}

TEST(StopMatcher, FalseStartIsHeldThenReleased) {
  StopMatcher matcher({"END"});
  const Streamed out = stream(matcher, {"an E", "N", "ding"});
  EXPECT_EQ(out.pushed, (Pieces{"an ", "", "ENding"}));
  EXPECT_FALSE(matcher.stopped());
}

TEST(StopMatcher, FlushReturnsHeldTextWhenNoStopCompletes) {
  StopMatcher matcher({"END"});
  const Streamed out = stream(matcher, {"abc EN"});
  EXPECT_EQ(out.pushed, (Pieces{"abc "}));
  EXPECT_EQ(out.flushed, "EN");
  EXPECT_FALSE(matcher.stopped());
  EXPECT_EQ(matcher.matched(), "");
}

TEST(StopMatcher, NothingIsEmittedAfterTheStop) {
  StopMatcher matcher({"stop"});
  EXPECT_EQ(matcher.push("a stop b"), "a ");
  EXPECT_EQ(matcher.push("more text"), "");
  EXPECT_EQ(matcher.push("stop"), "");
  EXPECT_EQ(matcher.flush(), "");
  EXPECT_EQ(matcher.matched(), "stop");
}

TEST(StopMatcher, OverlappingStopsShorterWinsAtTheSameStart) {
  StopMatcher matcher({"abc", "ab", "b"});
  EXPECT_EQ(stream(matcher, {"xa", "bc"}).pushed, (Pieces{"x", ""}));
  EXPECT_EQ(matcher.matched(), "ab");
}

TEST(StopMatcher, EarlierStartWinsOverEarlierCompletion) {
  // "b" completes first, but "abc" may still complete at an earlier start: wait for it.
  StopMatcher completes({"abc", "b"});
  EXPECT_EQ(stream(completes, {"xab", "c"}).pushed, (Pieces{"x", ""}));
  EXPECT_EQ(completes.matched(), "abc");

  StopMatcher fails({"abc", "b"});
  EXPECT_EQ(stream(fails, {"xab", "d"}).pushed, (Pieces{"x", "a"}));
  EXPECT_EQ(fails.matched(), "b");

  StopMatcher at_end({"abc", "b"});  // decided only when the text ends
  const Streamed out = stream(at_end, {"xab"});
  EXPECT_EQ(out.flushed, "a");
  EXPECT_EQ(at_end.matched(), "b");
}

TEST(StopMatcher, EmptyStopStringsAreIgnored) {
  StopMatcher matcher({"", "zz"});
  EXPECT_EQ(stream(matcher, {"abc", "def"}).pushed, (Pieces{"abc", "def"}));
  EXPECT_FALSE(matcher.stopped());
}

TEST(StopMatcher, HoldsBackWholeUtf8Characters) {
  // "é" is C3 A9: a piece ending after C3 must not emit half of it.
  StopMatcher plain({});
  EXPECT_EQ(stream(plain, {"caf\xC3", "\xA9!"}).pushed, (Pieces{"caf", "\xC3\xA9!"}));
  // "→" is E2 86 92; the held-back prefix of the stop is the whole character.
  StopMatcher arrow({"\xE2\x86\x92x"});
  const Streamed out = stream(arrow, {"a\xE2\x86", "\x92", "y"});
  EXPECT_EQ(out.pushed, (Pieces{"a", "", "\xE2\x86\x92y"}));
  EXPECT_FALSE(arrow.stopped());
}

// Random text over a small alphabet with multi-byte characters, so that stops, false starts and
// pieces that split characters are all frequent.
std::string random_text(std::mt19937& rng, size_t max_chars) {
  static const char* const kAlphabet[] = {"a", "b", "c", "\xC3\xA9", "\xE4\xB8\xAD"};
  std::string text;
  for (size_t n = rng() % (max_chars + 1); n > 0; --n) text += kAlphabet[rng() % 5];
  return text;
}

bool is_character_boundary(const std::string& text, size_t at) {
  return at == text.size() || (static_cast<unsigned char>(text[at]) & 0xC0) != 0x80;
}

TEST(StopMatcher, RandomTextsMatchPlainFind) {
  for (uint32_t seed = 0; seed < 3000; ++seed) {
    std::mt19937 rng(seed);
    const std::string text = random_text(rng, 40);
    std::vector<std::string> stops;
    for (size_t n = 1 + rng() % 3; n > 0; --n) stops.push_back(random_text(rng, 4));
    size_t cut = std::string::npos;
    size_t longest = 0;
    for (const std::string& stop : stops) {
      if (!stop.empty()) cut = std::min(cut, text.find(stop));
      longest = std::max(longest, stop.size());
    }

    StopMatcher matcher(stops);
    std::string emitted;
    size_t fed = 0;
    while (fed < text.size()) {
      const size_t piece = std::min(text.size() - fed, size_t(1 + rng() % 6));  // bytes
      emitted += matcher.push(std::string_view(text).substr(fed, piece));
      fed += piece;
      if (matcher.stopped()) break;
      EXPECT_TRUE(is_character_boundary(text, emitted.size())) << "seed " << seed;
      // Held back: a stop string's proper prefix, or an incomplete character (up to 3 bytes).
      EXPECT_LE(fed - emitted.size(), std::max(longest, size_t(4)) - 1) << "seed " << seed;
    }
    emitted += matcher.flush();

    ASSERT_EQ(emitted, text.substr(0, cut)) << "seed " << seed;
    ASSERT_EQ(matcher.stopped(), cut != std::string::npos) << "seed " << seed;
    if (matcher.stopped()) {
      EXPECT_EQ(text.compare(cut, matcher.matched().size(), matcher.matched()), 0);
      for (const std::string& stop : stops) {
        if (!stop.empty() && text.compare(cut, stop.size(), stop) == 0) {
          EXPECT_LE(matcher.matched().size(), stop.size()) << "seed " << seed;
        }
      }
    }
  }
}

}  // namespace
}  // namespace m1
