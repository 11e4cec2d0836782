#pragma once
// Reads a request body as JSON. Failures are 400s that say what is wrong and where: malformed
// JSON, invalid UTF-8 (naming the field that holds it), or nesting too deep to handle safely.

#include <string_view>

#include <nlohmann/json.hpp>

namespace m1::server {

// Deeper nesting is refused: rendering JSON back into a prompt recurses once per level.
constexpr int kMaxJsonDepth = 64;

// Parses a body that must be a JSON object. Throws ApiError (400).
nlohmann::ordered_json parse_json_body(std::string_view body);

// Throws ApiError (400) naming `param` ("": the whole body) when JSON text nests deeper than
// kMaxJsonDepth; whether the text is valid JSON is left to whoever parses it.
void check_json_depth(std::string_view json_text, const std::string& param);

}  // namespace m1::server
