// Fuzzes the grammar matcher with arbitrary text against fixed schemas. Whatever bytes the matcher
// accepts as a whole document parse as JSON and are valid against the schema by an independent
// validator (tests/schema_validator.h); where the text stops, the token mask of a small tokenizer
// equals trying every token one by one. Input: one byte choosing the schema, then the text.

#include <array>

#include "fuzz_support.h"
#include "m1/structured_output.h"
#include "schema_validator.h"
#include "structured/matcher.h"
#include "structured/token_index.h"
#include "structured/token_mask.h"

namespace {

constexpr std::array<const char*, 6> kSchemas = {
    R"({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer",
        "minimum": -3, "maximum": 130}, "email": {"type": "string", "format": "email"}}, "required": ["name"],
        "additionalProperties": {"type": "boolean"}})",
    R"({"type": "array", "prefixItems": [{"type": "number", "minimum": -2, "maximum": 5}, {"enum": ["a", null, 1.5]}],
        "items": {"type": "string", "pattern": "^[a-c]+<?$"}, "maxItems": 5})",
    R"({"$defs": {"t": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"$ref": "#/$defs/t"}}]}},
        "$ref": "#/$defs/t"})",
    R"({"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}, "id": {"type": "string",
        "format": "uuid"}, "t": {"type": "string", "format": "time"}}, "additionalProperties": false})",
    R"({"oneOf": [{"type": "object", "properties": {"k": {"const": 1}}, "required": ["k"]},
        {"type": "object", "properties": {"k": {"const": 2}, "v": {"type": "string"}}, "required": ["k"]}]})",
    R"({})",
};

struct Fixture {
  Fixture() : tokenizer(m1::Tokenizer::load(std::string(M1_SOURCE_DIR) + "/tests/data/golden/odd-f32/tokenizer.json")) {
    index = std::make_unique<m1::structured::TokenIndex>(tokenizer, tokenizer.vocab_size());
    for (const char* schema : kSchemas) {
      m1::OutputFormat format;
      format.document = m1::OutputFormat::Document::kSchema;
      format.schema = nlohmann::ordered_json::parse(schema);
      format.schema_what = "schema";
      grammars.push_back(m1::compile_output_grammar(format));
      validators.emplace_back(nlohmann::json::parse(schema));
    }
  }
  m1::Tokenizer tokenizer;
  std::unique_ptr<m1::structured::TokenIndex> index;
  std::vector<std::shared_ptr<m1::OutputGrammar>> grammars;
  std::vector<m1::testing::SchemaValidator> validators;
};

const Fixture& fixture() {
  static const Fixture f;
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fixture();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const Fixture& f = fixture();
  const size_t which = data[0] % kSchemas.size();
  const std::string_view text = m1::fuzz::as_text(data + 1, size - 1);
  m1::fuzz::must_not_throw([&] {
    m1::structured::Matcher matcher(f.grammars[which]);
    size_t accepted = 0;
    while (accepted < text.size() && matcher.advance(static_cast<uint8_t>(text[accepted]))) ++accepted;
    if (matcher.can_end()) {
      const std::string document(text.substr(0, accepted));
      const std::string why = f.validators[which].check_text(document);
      if (!why.empty()) m1::fuzz::bug("an accepted document is invalid: " + why + ": " + document);
    }
    std::vector<uint32_t> mask(size_t(f.index->words()));
    m1::structured::fill_token_mask(matcher, *f.index, {}, mask);
    for (int32_t id = 0; id < f.tokenizer.vocab_size(); ++id) {
      const bool in_mask = (mask[size_t(id) / 32] >> (id % 32)) & 1u;
      m1::fuzz::check(in_mask == m1::structured::token_allowed(matcher, f.tokenizer, id),
                      "the token mask equals trying each token");
    }
  });
  return 0;
}
