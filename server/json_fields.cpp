#include "json_fields.h"

#include <limits>

#include "api_error.h"

namespace m1::server {

const ordered_json* find_field(const ordered_json& object, const std::string& name) {
  const auto it = object.find(name);
  return it == object.end() || it->is_null() ? nullptr : &*it;
}

std::optional<bool> bool_field(const ordered_json& object, const std::string& name) {
  const ordered_json* value = find_field(object, name);
  if (value == nullptr) return std::nullopt;
  if (!value->is_boolean()) throw invalid_request(name + ": must be a boolean", name);
  return value->get<bool>();
}

std::optional<int64_t> integer_field(const ordered_json& object, const std::string& name) {
  const ordered_json* value = find_field(object, name);
  if (value == nullptr) return std::nullopt;
  if (value->is_number_unsigned() && value->get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    throw invalid_request(name + ": integer out of range", name);
  if (!value->is_number_integer()) throw invalid_request(name + ": must be an integer", name);
  return value->get<int64_t>();
}

std::optional<double> number_field(const ordered_json& object, const std::string& name) {
  const ordered_json* value = find_field(object, name);
  if (value == nullptr) return std::nullopt;
  if (!value->is_number()) throw invalid_request(name + ": must be a number", name);
  return value->get<double>();
}

std::optional<std::string> string_field(const ordered_json& object, const std::string& name) {
  const ordered_json* value = find_field(object, name);
  if (value == nullptr) return std::nullopt;
  if (!value->is_string()) throw invalid_request(name + ": must be a string", name);
  return value->get<std::string>();
}

}  // namespace m1::server
