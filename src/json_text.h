#pragma once
// Pieces of JSON quoted into one-line error messages, however deep or odd the input.

#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace m1 {

// Scalars as JSON; arrays and objects by kind only (printing them recurses, and a hostile file
// can nest deep enough to overflow the stack).
inline std::string json_brief(const nlohmann::json& v) {
  if (v.is_array()) return "a list";
  if (v.is_object()) return "an object";
  return v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// A name taken from a file, in double quotes with control characters escaped.
inline std::string quote_name(std::string_view name) {
  return nlohmann::json(std::string(name)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace m1
