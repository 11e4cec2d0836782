// The grammar engine (src/structured): the pattern subset, the JSON Schema compiler's keywords and
// refusals, the byte-level matcher, and token masks over the real tokenizer, each generated
// document checked by an independent validator (schema_validator.h). Set M1_TEST_SEED to replay.

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "m1/structured_output.h"
#include "m1/tokenizer.h"
#include "lexer_bound.h"
#include "schema_validator.h"
#include "structured/char_nfa.h"
#include "structured/matcher.h"
#include "structured/regex.h"
#include "structured/token_index.h"
#include "structured/token_mask.h"
#include "test_support.h"

namespace m1 {
namespace {

using nlohmann::ordered_json;
using structured::Matcher;

std::shared_ptr<OutputGrammar> schema_grammar(const std::string& schema_text) {
  OutputFormat format;
  format.document = OutputFormat::Document::kSchema;
  format.schema = ordered_json::parse(schema_text);
  format.schema_what = "schema";
  return compile_output_grammar(format);
}

// Whether the whole text is a document of the grammar.
bool accepts(const std::shared_ptr<OutputGrammar>& grammar, const std::string& text) {
  Matcher matcher(grammar);
  return matcher.advance_bytes(text) && matcher.can_end();
}

bool pattern_matches(const std::string& pattern, const std::string& text) {
  const structured::CharNfa nfa = structured::nfa_from_regex(structured::parse_pattern(pattern), "pattern");
  return structured::matches(nfa, structured::decode_utf8(text, "text"));
}

TEST(Pattern, MatchesAsEcmaScriptDoes) {
  EXPECT_TRUE(pattern_matches("abc", "xxabcxx"));  // unanchored: anywhere
  EXPECT_FALSE(pattern_matches("^abc$", "xxabc"));
  EXPECT_TRUE(pattern_matches("^[A-Z]{2,3}-\\d+$", "AB-12"));
  EXPECT_FALSE(pattern_matches("^[A-Z]{2,3}-\\d+$", "ABCD-12"));
  EXPECT_TRUE(pattern_matches("^(?:cat|dog)s?$", "dogs"));
  EXPECT_TRUE(pattern_matches("^(?<year>\\d{4})$", "2024"));
  EXPECT_TRUE(pattern_matches("^[^@\\s]+@x\\.org$", "me@x.org"));
  EXPECT_FALSE(pattern_matches("^.$", "\n"));  // '.' stops at line terminators
  EXPECT_TRUE(pattern_matches("^\\u00e9\\x41$", "\xC3\xA9" "A"));
  EXPECT_TRUE(pattern_matches("^[\\w.-]+$", "a_b.c-d"));
  EXPECT_TRUE(pattern_matches("^a|b$", "ab"));  // each alternative anchored on its own side
  // [] matches nothing, so [] repeated zero times matches the empty text, as in JavaScript; the
  // independent validator reads it so too (found by fuzz_json_schema).
  EXPECT_TRUE(pattern_matches("^[]{0}-\\d{3}$", "-226"));
  EXPECT_FALSE(pattern_matches("^[]$", "a"));
  const testing::SchemaValidator validator(nlohmann::json::parse(R"({"type": "string", "pattern": "^[]{0}-\\d{3}$"})"));
  EXPECT_EQ(validator.check_text("\"-226\""), "");
  EXPECT_NE(validator.check_text("\"x-226\""), "");
}

// Where ECMAScript and PCRE2 (which the independent validator uses) read a pattern differently,
// the engine and the validator must both read it as ECMAScript does (found by fuzz_json_schema).
TEST(Pattern, TheValidatorAgreesWithTheEngine) {
  const std::string bom = "\xEF\xBB\xBF", arabic_three = "\xD9\xA3", e_acute = "\xC3\xA9",
                    line_separator = "\xE2\x80\xA8", next_line = "\xC2\x85";
  const struct {
    std::string pattern, text;
    bool match;
  } cases[] = {
      {"^a\\sb$", "a" + bom + "b", true},  // U+FEFF is white space in ECMAScript alone
      {"^a[\\s]b$", "a" + bom + "b", true},
      {"^a[^\\s]b$", "a" + bom + "b", false},
      {"^a\\Sb$", "a" + bom + "b", false},
      {"^a[^\\S]b$", "a" + bom + "b", true},
      {"^a\\sb$", "a" + next_line + "b", false},  // U+0085 is white space in Unicode alone
      {"^a\\sb$", "a\vb", true},
      {"^\\D$", arabic_three, true},  // \d is [0-9] alone
      {"^\\d$", arabic_three, false},
      {"^[\\D]$", arabic_three, true},
      {"^\\W$", e_acute, true},  // \w is [A-Za-z0-9_] alone
      {"^[x\\w]$", e_acute, false},
      {"^.$", line_separator, false},  // '.' stops at every line terminator
      {"^.$", next_line, true},
      {"^a$", "a\n", false},  // '$' is the end of the text, not before a final newline
      {"^\\u00e9\\x41\\u{1F600}$", e_acute + "A\xF0\x9F\x98\x80", true},
      {"^\\v$", "\v", true},
      {"^\\v$", "\n", false},
      {"^[^]$", line_separator, true},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.pattern);
    EXPECT_EQ(pattern_matches(c.pattern, c.text), c.match);
    const testing::SchemaValidator validator(ordered_json{{"type", "string"}, {"pattern", c.pattern}});
    EXPECT_EQ(validator.check_text(ordered_json(c.text).dump()).empty(), c.match);
  }
}

// The subset construction's size against sizes worked out by hand. The construction is not
// minimised: the start keeps a state of its own where the minimal automaton would merge it, so each
// count is the minimal one plus at most one; the dead state is not counted. A construction stops
// at the first state past a bound.
TEST(Pattern, MeasuresDeterministicAutomata) {
  const auto size = [](const std::string& pattern, size_t max_states = 1000000, size_t max_entries = 100000000) {
    return structured::deterministic_size(structured::nfa_from_regex(structured::parse_pattern(pattern), "pattern"),
                                          max_states, max_entries);
  };
  EXPECT_EQ(size("^abc$").states, 4u);
  EXPECT_EQ(size("^abc$").entries, 4u);  // one NFA state each
  EXPECT_LE(size("^a*$").states, 2u);
  // The last k + 1 letters of a [ab]* prefix are all remembered: 2^(k+1) states.
  for (int k : {0, 1, 2, 5, 9}) {
    const size_t minimal = size_t(2) << k;
    EXPECT_GE(size("^[ab]*a[ab]{" + std::to_string(k) + "}$").states, minimal) << k;
    EXPECT_LE(size("^[ab]*a[ab]{" + std::to_string(k) + "}$").states, minimal + 1) << k;
  }
  EXPECT_EQ(size("^[ab]*a[ab]{9}$", 1000).states, 1001u);
  EXPECT_EQ(size("^[ab]*a[ab]{30}$", 20000).states, 20001u);  // stops at the bound, not near 2^31
  // Where an 'a' stood among the last 10,000 characters: few states yet, but their sets grow by
  // one NFA state a character. The entries' bound stops it after a few hundred states.
  const structured::DeterministicSize wide = size("^.*a.{9999}$", 1000000, 100000);
  EXPECT_GT(wide.entries, 100000u);
  EXPECT_LT(wide.entries, 100000u + 10002u);
  EXPECT_LT(wide.states, 1000u);
  // Classes: \d and [0-4] overlap, so 0-4, 5-9 and the rest are told apart: after a first digit
  // of 0-4 both branches go on, after 5-9 one; then three different sets of finished branches.
  EXPECT_EQ(size("^(\\d[0-4]|[0-4]\\d)$").states, 6u);
}

TEST(Pattern, RefusesWhatItDoesNotSupport) {
  for (const char* pattern : {"(a)\\1", "a(?=b)", "a(?!b)", "(?<=a)b", "\\bword", "\\p{L}", "a^b", "(a$)", "[b-a]",
                              "a{2,1}", "(", "a)", "*a", "a{99999}"})
    testing::expect_error([&] { structured::parse_pattern(pattern); }, {"pattern"});
}

TEST(JsonSchema, WritesDocumentsCompactly) {
  const auto grammar = schema_grammar(R"({"type": "object", "properties": {"a": {"type": "integer"},
      "b": {"type": "array", "items": {"type": "string"}}}, "required": ["a"]})");
  EXPECT_TRUE(accepts(grammar, R"({"a": 1})"));
  EXPECT_TRUE(accepts(grammar, R"({"a": -12, "b": ["x", "y"]})"));
  EXPECT_TRUE(accepts(grammar, R"({"a": 0, "b": []})"));
  EXPECT_FALSE(accepts(grammar, R"({"a":1})"));      // the separators are fixed
  EXPECT_FALSE(accepts(grammar, R"({"a": 1 })"));
  EXPECT_FALSE(accepts(grammar, R"({"b": [], "a": 1})"));  // declared order
  EXPECT_FALSE(accepts(grammar, R"({"a": 01})"));
  EXPECT_FALSE(accepts(grammar, R"({})"));          // a is required
  EXPECT_FALSE(accepts(grammar, R"({"a": 1, "c": 2})"));
  EXPECT_FALSE(accepts(grammar, R"({"a": 1)"));
}

TEST(JsonSchema, Strings) {
  const auto plain = schema_grammar(R"({"type": "string"})");
  EXPECT_TRUE(accepts(plain, R"("a \"quoted\" \\ line\nnext\u001f")"));
  EXPECT_TRUE(accepts(plain, "\"caf\xC3\xA9 \xE2\x82\xAC\""));
  EXPECT_FALSE(accepts(plain, "\"raw\nnewline\""));
  EXPECT_FALSE(accepts(plain, R"("\/")"));           // one spelling per character
  EXPECT_FALSE(accepts(plain, R"("\u0041")"));
  EXPECT_FALSE(accepts(plain, "\"\xC3\""));          // broken UTF-8
  EXPECT_FALSE(accepts(plain, "\"a <think> b\""));   // markers only as their tokens
  EXPECT_TRUE(accepts(plain, "\"a <thinking> b\""));
  const auto bounded = schema_grammar(R"({"type": "string", "minLength": 2, "maxLength": 3})");
  EXPECT_FALSE(accepts(bounded, R"("a")"));
  EXPECT_TRUE(accepts(bounded, "\"\xC3\xA9\xC3\xA9\xC3\xA9\""));  // code points, not bytes
  EXPECT_TRUE(accepts(bounded, R"("\n\t")"));
  EXPECT_FALSE(accepts(bounded, R"("abcd")"));
  const auto pattern = schema_grammar(R"({"type": "string", "pattern": "^[a-z]+\\d$", "maxLength": 4})");
  EXPECT_TRUE(accepts(pattern, R"("ab1")"));
  EXPECT_FALSE(accepts(pattern, R"("abcd1")"));
  EXPECT_FALSE(accepts(pattern, R"("ab")"));
}

TEST(JsonSchema, Formats) {
  const auto date = schema_grammar(R"({"type": "string", "format": "date"})");
  EXPECT_TRUE(accepts(date, R"("2024-02-29")"));
  EXPECT_FALSE(accepts(date, R"("2023-02-29")"));
  EXPECT_TRUE(accepts(date, R"("2000-02-29")"));
  EXPECT_FALSE(accepts(date, R"("1900-02-29")"));
  EXPECT_FALSE(accepts(date, R"("2024-04-31")"));
  const auto date_time = schema_grammar(R"({"type": "string", "format": "date-time"})");
  EXPECT_TRUE(accepts(date_time, R"("2024-05-01T23:59:59.5+02:00")"));
  EXPECT_TRUE(accepts(date_time, R"("2024-05-01T00:00:00Z")"));
  EXPECT_FALSE(accepts(date_time, R"("2024-05-01T24:00:00Z")"));
  const auto uuid = schema_grammar(R"({"type": "string", "format": "uuid"})");
  EXPECT_TRUE(accepts(uuid, R"("123e4567-e89b-12d3-a456-426614174000")"));
  const auto email = schema_grammar(R"({"type": "string", "format": "email"})");
  EXPECT_TRUE(accepts(email, R"("first.last+tag@mail.example.org")"));
  EXPECT_FALSE(accepts(email, R"("no-at-sign.org")"));
  EXPECT_FALSE(accepts(email, R"("a@-bad.org")"));
}

TEST(JsonSchema, Numbers) {
  const auto range = schema_grammar(R"({"type": "integer", "minimum": -15, "maximum": 120})");
  for (const char* ok : {"-15", "-9", "0", "7", "99", "100", "120"}) EXPECT_TRUE(accepts(range, ok)) << ok;
  for (const char* bad : {"-16", "121", "-0", "007", "1.0", "200"}) EXPECT_FALSE(accepts(range, bad)) << bad;
  const auto exclusive = schema_grammar(R"({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10})");
  EXPECT_FALSE(accepts(exclusive, "0"));
  EXPECT_TRUE(accepts(exclusive, "1"));
  EXPECT_FALSE(accepts(exclusive, "10"));
  const auto number = schema_grammar(R"({"type": "number"})");
  for (const char* ok : {"0", "-0.5", "1e10", "2.5E-3", "12"}) EXPECT_TRUE(accepts(number, ok)) << ok;
  for (const char* bad : {".5", "1.", "+1", "01", "1e"}) EXPECT_FALSE(accepts(number, bad)) << bad;
  const auto bounded = schema_grammar(R"({"type": "number", "minimum": -2, "maximum": 3})");
  for (const char* ok : {"-2", "-2.0", "-1.75", "-0.5", "0", "2.99", "3", "3.000"}) EXPECT_TRUE(accepts(bounded, ok)) << ok;
  for (const char* bad : {"-2.01", "3.01", "4", "-3"}) EXPECT_FALSE(accepts(bounded, bad)) << bad;
}

TEST(JsonSchema, Combinations) {
  const auto one_of = schema_grammar(R"({"oneOf": [
      {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}}, "required": ["kind", "r"],
       "additionalProperties": false},
      {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "number"}}, "required": ["kind"],
       "additionalProperties": false}]})");
  EXPECT_TRUE(accepts(one_of, R"({"kind": "circle", "r": 2})"));
  EXPECT_TRUE(accepts(one_of, R"({"kind": "square"})"));
  EXPECT_FALSE(accepts(one_of, R"({"kind": "circle"})"));
  const auto all_of = schema_grammar(R"({"allOf": [
      {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
      {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]})");
  EXPECT_TRUE(accepts(all_of, R"({"a": "x", "b": true})"));
  EXPECT_FALSE(accepts(all_of, R"({"a": "x"})"));
  const auto tree = schema_grammar(R"({"$defs": {"node": {"type": "object", "properties": {
      "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
      "required": ["value"], "additionalProperties": false}}, "$ref": "#/$defs/node"})");
  EXPECT_TRUE(accepts(tree, R"({"value": 1, "children": [{"value": 2}, {"value": 3, "children": [{"value": 4}]}]})"));
  EXPECT_FALSE(accepts(tree, R"({"value": 1, "children": [{"children": []}]})"));
  const auto extra = schema_grammar(R"({"type": "object", "properties": {"id": {"type": "integer"}},
      "additionalProperties": {"type": "boolean"}})");
  EXPECT_TRUE(accepts(extra, R"({"id": 1, "x": true, "y": false})"));
  EXPECT_FALSE(accepts(extra, R"({"id": 1, "x": 3})"));
  EXPECT_FALSE(accepts(extra, R"({"id": 1, "id": true})"));  // a declared name is not an extra one
  const auto bounded = schema_grammar(R"({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
      "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4})");
  EXPECT_TRUE(accepts(bounded, R"(["a"])"));
  EXPECT_TRUE(accepts(bounded, R"(["a", 1, true, false])"));
  EXPECT_FALSE(accepts(bounded, R"([])"));
  EXPECT_FALSE(accepts(bounded, R"(["a", 1, true, false, true])"));
  EXPECT_FALSE(accepts(bounded, R"([1])"));
  const auto values = schema_grammar(R"({"enum": ["red", 2, null, {"a": [1, "b"]}]})");
  EXPECT_TRUE(accepts(values, R"({"a": [1, "b"]})"));
  EXPECT_TRUE(accepts(values, "null"));
  EXPECT_FALSE(accepts(values, R"("blue")"));
}

// A counted repetition grows the NFA as much as the deterministic automaton: long ones pass the
// blow-up check, and their documents match.
TEST(JsonSchema, LongCountedPatternsPass) {
  // About 20,000 deterministic states, past the floor of 10,000 but not twice the NFA's.
  const auto grammar = schema_grammar(R"({"type": "string", "pattern": "^[a-z]{0,10000}-[0-9]{1,10000}$"})");
  EXPECT_TRUE(accepts(grammar, "\"" + std::string(9000, 'q') + "-" + std::string(9999, '7') + "\""));
  EXPECT_FALSE(accepts(grammar, "\"" + std::string(10001, 'q') + "-7\""));
}

// The lexer's bound: a bound below what compiling needs is refused up front, and matching that
// needs a state past it is refused mid-document, both as the request's fault (m1::RequestError),
// with the bound in the message; the default bound matches the same document.
TEST(JsonSchema, LexerStatesStopAtTheirBound) {
  OutputFormat format;
  format.document = OutputFormat::Document::kSchema;
  format.schema = ordered_json::parse(R"({"type": "object", "properties": {"id": {"anyOf": [
      {"type": "string", "pattern": "^[a-f0-9]{8}-x$"}, {"type": "string", "pattern": "^[a-f]*b[a-f]{3}$"}]}},
      "required": ["id"]})");
  format.schema_what = "schema";
  const std::string document = R"({"id": "0123abcd-x"})";
  const int32_t least = testing::least_lexer_bound(format);
  ASSERT_GT(least, 1);
  format.max_lexer_states = least - 1;
  testing::expect_error<RequestError>([&] { compile_output_grammar(format); },
                                      {fmt::format("needs more than {} lexer states", least - 1)});
  format.max_lexer_states = least;
  Matcher bounded(compile_output_grammar(format));
  testing::expect_error<RequestError>([&] { bounded.advance_bytes(document); },
                                      {fmt::format("needs more than {} lexer states", least)});
  format.max_lexer_states = kDefaultMaxLexerStates;
  EXPECT_TRUE(accepts(compile_output_grammar(format), document));
}

TEST(JsonSchema, RefusesWithTheKeywordAndPlace) {
  const auto refuse = [](const std::string& schema, const std::vector<std::string>& parts) {
    testing::expect_error([&] { schema_grammar(schema); }, parts);
  };
  refuse(R"({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 2}}})",
         {"schema", "#/properties/a/multipleOf", "unsupported keyword 'multipleOf'"});
  refuse(R"({"not": {"type": "null"}})", {"unsupported keyword 'not'"});
  refuse(R"({"type": "string", "format": "uri"})", {"format 'uri' is not supported"});
  refuse(R"({"type": "strin"})", {"#/type", "type must be one of"});
  refuse(R"({"$ref": "#/$defs/missing"})", {"no such place"});
  refuse(R"({"$ref": "http://example.com/s.json"})", {"only references within the schema"});
  refuse(R"({"type": "string", "pattern": "(a)\\1"})", {"#/pattern", "backreferences"});
  // Refused up front, not while matching: this pattern's deterministic automaton takes 2^19 states
  // (found by fuzz_json_schema, whose walk spent 34 s building the lexer of one like it).
  refuse(R"({"type": "object", "properties": {"id": {"type": "string", "pattern": "^[ab]*a[ab]{18}$"}}})",
         {"#/properties/id", "pattern '^[ab]*a[ab]{18}$' is too complex to match", "passes 10000 states"});
  // Few states, but sets of thousands of NFA states each.
  refuse(R"({"type": "string", "pattern": "^.*a.{9999}$"})", {"schema: #: pattern '^.*a.{9999}$' is too complex"});
  refuse(R"({"type": "integer", "minimum": 5, "maximum": 2})", {"no JSON document satisfies it"});
  refuse(R"({"type": "string", "minLength": 4, "maxLength": 2})", {"no JSON document satisfies it"});
  refuse(R"({"type": "object", "required": ["a"], "additionalProperties": false})", {"no JSON document satisfies it"});
  refuse(R"({"enum": []})", {"no JSON document satisfies it"});
  refuse(R"({"type": "string", "enum": [1, 2]})", {"no JSON document satisfies it"});
  refuse(R"({"oneOf": [{"type": "integer"}, {"type": "number"}]})", {"#/oneOf", "branches 0 and 1 may both match"});
  refuse(R"({"type": "array", "items": [{"type": "string"}]})", {"prefixItems"});
  refuse(R"({"type": "array", "uniqueItems": true})", {"uniqueItems"});
  refuse(R"({"type": "number", "minimum": 0.5})", {"bounds of numbers must be integers"});
  refuse(R"({"type": "string", "maxLength": 1000000})", {"maxLength above"});
  refuse(R"([1, 2])", {"a schema must be an object or a boolean"});
  refuse(R"(false)", {"no JSON document satisfies it"});
  refuse(R"({"type": "array", "minItems": 5000})", {"#/minItems", "minItems above 4096 is not supported"});
  std::string deep = R"({"type": "string"})";
  for (int i = 0; i < 130; ++i) deep = R"({"type": "array", "items": )" + deep + "}";
  refuse(deep, {"nests deeper than 128 levels"});
}

// The real tokenizer, once.
const Tokenizer& real_tokenizer() {
  static const Tokenizer tokenizer = Tokenizer::load(std::string(M1_SOURCE_DIR) + "/data/minimax-m1/tokenizer.json");
  return tokenizer;
}
std::shared_ptr<const TokenVocabulary> real_vocabulary() {
  static const auto vocabulary = std::make_shared<const TokenVocabulary>(real_tokenizer(), 200064);
  return vocabulary;
}

bool bit(const std::vector<uint32_t>& mask, int32_t id) { return (mask[size_t(id) / 32] >> (id % 32)) & 1u; }

// Draws tokens uniformly among those the mask allows until the grammar must end, ends by
// choice, or `limit` tokens; returns the text, and whether it ended.
std::pair<std::string, bool> generate(const std::shared_ptr<OutputGrammar>& grammar, std::mt19937_64& rng, int limit,
                                      int32_t end_token) {
  const auto vocabulary = real_vocabulary();
  GrammarMatcher matcher(grammar, vocabulary);
  std::vector<uint32_t> mask(size_t(vocabulary->index().words()));
  std::string text;
  const std::vector<int32_t> ends{end_token};
  for (int step = 0; step < limit; ++step) {
    if (matcher.must_end()) return {text, true};
    matcher.fill_mask(mask, ends);
    std::vector<int32_t> allowed;
    for (int32_t id = 0; id < 200064; ++id)
      if (bit(mask, id)) allowed.push_back(id);
    if (allowed.empty()) {
      ADD_FAILURE() << "no token allowed after: " << text;
      return {text, false};
    }
    // Prefer short tokens now and then, so that documents finish.
    int32_t id = allowed[rng() % allowed.size()];
    if (rng() % 2) {
      for (int tries = 0; tries < 8; ++tries) {
        const int32_t other = allowed[rng() % allowed.size()];
        if (other == end_token || real_tokenizer().token_bytes(other).size() < real_tokenizer().token_bytes(id).size()) id = other;
      }
    }
    if (id == end_token) return {text, true};
    EXPECT_TRUE(matcher.accept(id)) << "the mask allowed a token the matcher refuses: " << id;
    text += real_tokenizer().token_bytes(id);
  }
  return {text, false};
}

// The schemas the generation tests run: nested, recursive, enums, bounded arrays, formats.
const std::vector<std::string>& test_schemas() {
  static const std::vector<std::string> schemas = {
      R"({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer",
          "minimum": 0, "maximum": 130}, "email": {"type": "string", "format": "email", "maxLength": 30}},
          "required": ["name", "age"], "additionalProperties": false})",
      R"({"type": "array", "items": {"enum": ["red", "green", "blue", 7, null]}, "minItems": 2, "maxItems": 5})",
      R"({"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
          "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["v"],
          "additionalProperties": false}}, "$ref": "#/$defs/node"})",
      R"({"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}, "id": {"type": "string",
          "format": "uuid"}, "day": {"type": "string", "format": "date"}, "at": {"type": "string", "format": "time"}},
          "required": ["when", "id", "day", "at"], "additionalProperties": false})",
      R"({"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "number", "minimum": -5,
          "maximum": 5}}, "required": ["kind", "x"], "additionalProperties": false}, {"type": "object", "properties":
          {"kind": {"const": "b"}, "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"},
          "maxItems": 3}}, "required": ["kind"], "additionalProperties": false}]})",
      R"({"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "null"}], "items": {"type": "integer"},
          "minItems": 3, "maxItems": 6})",
      R"({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"}},
          "required": ["code"], "additionalProperties": {"type": "integer", "minimum": 1, "maximum": 3}})",
      R"({"anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer"}, {"type": "array", "items":
          {"type": "boolean"}, "maxItems": 3}]})",
  };
  return schemas;
}

TEST(TokenMask, GeneratedDocumentsAreValid) {
  std::mt19937_64& rng = testing::rng();
  const int32_t end = *real_tokenizer().token_id("<end_of_sentence>");
  int finished = 0;
  for (const std::string& schema : test_schemas()) {
    SCOPED_TRACE(schema);
    const auto grammar = schema_grammar(schema);
    const testing::SchemaValidator validator(nlohmann::json::parse(schema));
    for (int run = 0; run < 3; ++run) {
      const auto [text, ended] = generate(grammar, rng, 300, end);
      if (!ended) continue;
      ++finished;
      EXPECT_EQ(validator.check_text(text), "") << text;
    }
  }
  EXPECT_GE(finished, int(test_schemas().size())) << "too few documents finished to check";
}

// The mask against trying every token one by one, at states along generated documents.
TEST(TokenMask, MatchesTokenByTokenReference) {
  std::mt19937_64& rng = testing::rng();
  const auto vocabulary = real_vocabulary();
  for (const std::string& schema : {test_schemas()[0], test_schemas()[4], test_schemas()[6]}) {
    SCOPED_TRACE(schema);
    const auto grammar = schema_grammar(schema);
    Matcher matcher(grammar);
    std::vector<uint32_t> mask(size_t(vocabulary->index().words()));
    for (int step = 0; step < 6 && !matcher.must_end(); ++step) {
      structured::fill_token_mask(matcher, vocabulary->index(), {}, mask);
      std::vector<int32_t> allowed;
      for (int32_t id = 0; id < real_tokenizer().vocab_size(); ++id) {
        const bool expected = structured::token_allowed(matcher, real_tokenizer(), id);
        ASSERT_EQ(bit(mask, id), expected) << "token " << id << " '" << real_tokenizer().token_bytes(id) << "' at step " << step;
        if (expected) allowed.push_back(id);
      }
      ASSERT_FALSE(allowed.empty());
      ASSERT_TRUE(matcher.advance_bytes(real_tokenizer().token_bytes(allowed[rng() % allowed.size()])));
    }
  }
}

// The same where the last bytes begin a marker's text (the mask then treats the tokens that
// continue it apart), inside a counted string, and in free text before a tool block.
TEST(TokenMask, MatchesReferenceAfterMarkerPrefixes) {
  const auto vocabulary = real_vocabulary();
  const auto check = [&](const std::shared_ptr<OutputGrammar>& grammar, const std::string& prefix) {
    SCOPED_TRACE(prefix);
    Matcher matcher(grammar);
    ASSERT_TRUE(matcher.advance_bytes(prefix));
    std::vector<uint32_t> mask(size_t(vocabulary->index().words()));
    structured::fill_token_mask(matcher, vocabulary->index(), {}, mask);
    for (int32_t id = 0; id < real_tokenizer().vocab_size(); ++id)
      ASSERT_EQ(bit(mask, id), structured::token_allowed(matcher, real_tokenizer(), id))
          << "token " << id << " '" << real_tokenizer().token_bytes(id) << "'";
  };
  const auto strings = schema_grammar(R"({"type": "array", "items": {"type": "string", "maxLength": 9}})");
  for (const char* prefix : {"[\"a<", "[\"a</", "[\"</th", "[\"<tool_ca", "[\"ab", "[\"abcdefgh", "[\"x\", \"<t"})
    check(strings, prefix);
  OutputFormat tools;
  tools.calls = OutputFormat::Calls::kOptional;
  tools.tools.push_back({"get_weather", ordered_json::parse(R"({"type": "object", "properties": {"city": {"type": "string"}},
      "required": ["city"], "additionalProperties": false})"), "tools[0].function.parameters"});
  const auto text = compile_output_grammar(tools);
  for (const char* prefix : {"Let me see <", "Hmm </tool", "plain text"}) check(text, prefix);
}

}  // namespace
}  // namespace m1
