#include "json_body.h"

#include <string>
#include <vector>

#include <fmt/format.h>

#include "api_error.h"

namespace m1::server {
namespace {

using nlohmann::ordered_json;

// Follows a SAX parse to know which field is being read when the parser fails, so that an
// error inside a string can name it ("messages[1].content").
class FieldTracker : public nlohmann::json_sax<ordered_json> {
 public:
  std::string failed_at;  // the field being read at the parse error

  bool null() override { return value_done(); }
  bool boolean(bool) override { return value_done(); }
  bool number_integer(number_integer_t) override { return value_done(); }
  bool number_unsigned(number_unsigned_t) override { return value_done(); }
  bool number_float(number_float_t, const string_t&) override { return value_done(); }
  bool string(string_t&) override { return value_done(); }
  bool binary(binary_t&) override { return value_done(); }
  bool start_object(std::size_t) override { return open(false); }
  bool start_array(std::size_t) override { return open(true); }
  bool end_object() override { return close(); }
  bool end_array() override { return close(); }
  bool key(string_t& name) override {
    frames_.back().key = name;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    failed_at = path();
    return false;
  }

 private:
  struct Frame {
    bool array = false;
    size_t elements = 0;  // arrays: elements read so far, so the one being read is [elements]
    std::string key;      // objects: the member being read
  };

  bool open(bool array) {
    frames_.push_back({array, 0, {}});
    return frames_.size() <= size_t(kMaxJsonDepth);
  }
  bool close() {
    frames_.pop_back();
    return value_done();
  }
  bool value_done() {
    if (!frames_.empty() && frames_.back().array) ++frames_.back().elements;
    return true;
  }
  std::string path() const {
    std::string out;
    for (const Frame& frame : frames_) {
      if (frame.array) {
        out += fmt::format("[{}]", frame.elements);
      } else if (!frame.key.empty()) {
        out += (out.empty() ? "" : ".") + frame.key;
      }
    }
    return out;
  }

  std::vector<Frame> frames_;
};

std::string field_with_parse_error(std::string_view body) {
  FieldTracker tracker;
  ordered_json::sax_parse(body, &tracker);
  return tracker.failed_at;
}

// nlohmann's message without its "[json.exception.parse_error.101] " prefix.
std::string parse_reason(const ordered_json::parse_error& error) {
  const std::string what = error.what();
  const size_t end_of_prefix = what.find("] ");
  return end_of_prefix == std::string::npos ? what : what.substr(end_of_prefix + 2);
}

ApiError parse_failure(std::string_view body, const ordered_json::parse_error& error) {
  const std::string reason = parse_reason(error);
  const bool bad_utf8 = reason.find("UTF-8") != std::string::npos || reason.find("surrogate") != std::string::npos;
  if (!bad_utf8) return invalid_request("malformed JSON: " + reason);
  const std::string field = field_with_parse_error(body);
  return invalid_request(fmt::format("{}: invalid UTF-8 in a string", field.empty() ? "request body" : field), field);
}

}  // namespace

ordered_json parse_json_body(std::string_view body) {
  check_json_depth(body, "");
  ordered_json value;
  try {
    value = ordered_json::parse(body);
  } catch (const ordered_json::parse_error& error) {
    throw parse_failure(body, error);
  }
  if (!value.is_object()) throw invalid_request("request body: must be a JSON object");
  return value;
}

void check_json_depth(std::string_view json_text, const std::string& param) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (const char c : json_text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) {
        const std::string where = param.empty() ? "request body" : param;
        throw invalid_request(fmt::format("{}: JSON nests deeper than {} levels", where, kMaxJsonDepth), param);
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

}  // namespace m1::server
