#pragma once
// The OpenAI error shape: an exception that carries the HTTP status, the error type and the
// parameter at fault, and renders as {"error": {"message", "type", "param", "code"}}.

#include <stdexcept>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace m1::server {

class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string type, const std::string& message, std::string param = {}, std::string code = {})
      : std::runtime_error(message), status(status), type(std::move(type)), param(std::move(param)),
        code(std::move(code)) {}

  int status;
  std::string type;
  std::string param;  // empty: not tied to one parameter
  std::string code;   // empty: none
};

ApiError invalid_request(const std::string& message, std::string param = {});  // 400
ApiError not_found(const std::string& message, std::string param = {}, std::string code = {});  // 404
ApiError unavailable(const std::string& message, std::string code);  // 503

// A 400 from an engine-side m1::Error, whose message starts with the parameter it names
// ("top_p must be in (0, 1], got 0" or "messages[2].role: unknown role").
ApiError invalid_request_from(const std::exception& error);

// A 400 for what the request's own `param` caused (m1::RequestError, whose message names no
// parameter): "param: message".
ApiError request_fault(const std::string& param, const std::string& message);

// The parameter a one-line m1::Error message starts with, or "" when it names none.
std::string leading_parameter(std::string_view message);

nlohmann::ordered_json error_json(const ApiError& error);

}  // namespace m1::server
