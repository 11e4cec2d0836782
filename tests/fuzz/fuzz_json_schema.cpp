// Fuzzes the JSON Schema compiler with arbitrary schemas. A schema is compiled or refused with
// m1::Error, nothing else; a compiled one yields documents (drawn byte by byte, seeded by the
// input) that parse as JSON and that an independent validator (tests/schema_validator.h) accepts.
// Input: the schema's JSON text.

#include <functional>
#include <random>

#include "fuzz_support.h"
#include "grammar_walk.h"
#include "m1/structured_output.h"
#include "schema_validator.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text = m1::fuzz::as_text(data, size);
  // Schemas nest at most 64 deep here (the server bounds a request body's nesting likewise).
  bool too_deep = false;
  const auto limit_depth = [&](int depth, nlohmann::ordered_json::parse_event_t, nlohmann::ordered_json&) {
    too_deep = too_deep || depth > 64;
    return !too_deep;
  };
  const nlohmann::ordered_json schema = nlohmann::ordered_json::parse(text, limit_depth, /*allow_exceptions=*/false);
  if (schema.is_discarded() || too_deep) return 0;
  m1::OutputFormat format;
  format.document = m1::OutputFormat::Document::kSchema;
  format.schema = schema;
  format.schema_what = "schema";
  std::shared_ptr<m1::OutputGrammar> grammar;
  if (m1::fuzz::m1_error_of([&] { grammar = m1::compile_output_grammar(format); })) return 0;
  m1::fuzz::must_not_throw([&] {
    std::mt19937_64 rng(std::hash<std::string_view>{}(text));
    const m1::testing::SchemaValidator validator(nlohmann::json::parse(text));
    for (int document = 0; document < 2; ++document) {
      m1::structured::Matcher matcher(grammar);
      const auto drawn = m1::testing::walk_document(matcher, rng, 600);
      if (!drawn) continue;
      const std::string why = validator.check_text(*drawn);
      if (!why.empty()) m1::fuzz::bug("a document of the grammar is invalid: " + why + ": " + *drawn);
    }
  });
  return 0;
}
