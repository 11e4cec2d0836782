#pragma once
// The one exception type for user-facing failures. Its message is a single line that names the
// file, field or parameter at fault, so tools can print it as is and the server can return it.

#include <stdexcept>
#include <string>
#include <utility>

#include <fmt/format.h>

namespace m1 {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A failure that a request's own parameters cause but that shows only while it is served (an
// output format whose matcher outgrows its bound mid-generation): the request fails alone, and
// the server answers it as the client's error, not its own.
class RequestError : public Error {
 public:
  using Error::Error;
};

template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace m1
