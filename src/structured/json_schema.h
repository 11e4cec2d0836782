#pragma once
// JSON Schema to grammar rules. Documents are written compactly: ", " between items and ": "
// after keys (what Python's json.dumps writes, and how the model writes its tool calls), no other
// whitespace; object properties in the order the schema declares them; strings with one spelling
// per character (escapes only for '"', '\' and control characters).
//
// Keywords: type (all seven, or a list), enum, const, properties, required,
// additionalProperties (false, true or a schema), items, prefixItems, minItems, maxItems, anyOf,
// oneOf (branches must exclude each other), allOf, $ref into the same document ($defs,
// definitions, any JSON pointer; recursion allowed), minLength, maxLength, pattern (regex.h),
// format (date-time, date, time, uuid, email), minimum, maximum, exclusiveMinimum,
// exclusiveMaximum (any bound for integers; inclusive integer bounds for numbers),
// uniqueItems: false, and the annotations ($schema, $id, $comment, title, description, default,
// examples, deprecated, readOnly, writeOnly, contentMediaType, contentEncoding). Any other
// keyword, a malformed schema, and one no document satisfies are refused with an m1::Error
// naming the place.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "structured/grammar.h"
#include "structured/json_scalars.h"

namespace m1::structured {

class JsonGrammar {
 public:
  explicit JsonGrammar(GrammarBuilder& builder) : b_(builder) {}

  // A nonterminal deriving the documents `schema` accepts; the schema is the root of its own
  // $ref namespace. `what` names it in errors, e.g. "response_format.json_schema.schema". Throws
  // m1::Error for an unsupported keyword, a malformed schema, or one no document satisfies.
  int32_t schema(const nlohmann::ordered_json& schema, const std::string& what);
  int32_t any_value();
  int32_t any_object();
  // The text of `value` as these documents write it.
  static std::string dump(const nlohmann::ordered_json& value);

 private:
  friend class SchemaCompiler;
  int32_t string_terminal(const StringConstraints& constraints, const std::string& where);
  int32_t number_terminal(bool integer, const IntegerBounds& bounds);
  // A JSON string whose decoded contents are `content`.
  int32_t quoted_terminal(const CharNfa& content, const char* name);
  // A quoted key written without escapes, none of `excluded`.
  int32_t other_key_terminal(const std::vector<std::string>& excluded);
  int32_t comma() { return b_.literal(", "); }
  int32_t colon() { return b_.literal(": "); }

  GrammarBuilder& b_;
  int32_t any_value_ = -1, any_object_ = -1;
  std::map<std::string, int32_t> terminals_;  // string, number and key terminals by their definition
};

}  // namespace m1::structured
