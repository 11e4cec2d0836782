#include "api_error.h"

#include <algorithm>
#include <cctype>

#include <fmt/format.h>

namespace m1::server {

ApiError invalid_request(const std::string& message, std::string param) {
  return ApiError(400, "invalid_request_error", message, std::move(param));
}

ApiError not_found(const std::string& message, std::string param, std::string code) {
  return ApiError(404, "not_found_error", message, std::move(param), std::move(code));
}

ApiError unavailable(const std::string& message, std::string code) {
  return ApiError(503, "service_unavailable", message, {}, std::move(code));
}

ApiError invalid_request_from(const std::exception& error) {
  return invalid_request(error.what(), leading_parameter(error.what()));
}

ApiError request_fault(const std::string& param, const std::string& message) {
  return invalid_request(fmt::format("{}: {}", param, message), param);
}

std::string leading_parameter(std::string_view message) {
  const size_t end = message.find_first_of(": ");
  if (end == 0 || end == std::string_view::npos) return {};
  const std::string_view word = message.substr(0, end);
  const bool is_path = std::all_of(word.begin(), word.end(), [](unsigned char c) {
    return std::isalnum(c) || c == '_' || c == '.' || c == '[' || c == ']';
  });
  return is_path ? std::string(word) : std::string();
}

nlohmann::ordered_json error_json(const ApiError& error) {
  const auto or_null = [](const std::string& text) {
    return text.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(text);
  };
  return {{"error",
           {{"message", error.what()}, {"type", error.type}, {"param", or_null(error.param)},
            {"code", or_null(error.code)}}}};
}

}  // namespace m1::server
