#pragma once
// Typed reads of optional request fields. Absent and null both mean "not given", as OpenAI
// clients send either; a value of the wrong type is a 400 naming the field.

#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace m1::server {

using nlohmann::ordered_json;

// The field's value, or nullptr when it is absent or null.
const ordered_json* find_field(const ordered_json& object, const std::string& name);

std::optional<bool> bool_field(const ordered_json& object, const std::string& name);
std::optional<int64_t> integer_field(const ordered_json& object, const std::string& name);
std::optional<double> number_field(const ordered_json& object, const std::string& name);
std::optional<std::string> string_field(const ordered_json& object, const std::string& name);

}  // namespace m1::server
