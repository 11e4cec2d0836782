#pragma once
// A JSON Schema validator for the tests, written apart from the grammar engine (src/structured)
// and sharing nothing with it: it checks a parsed document against a schema keyword by keyword,
// as JSON Schema 2020-12 and ajv define them, for the keywords m1 supports. Patterns are matched
// with PCRE2 in UTF mode, each ECMAScript construct whose meaning differs there spelled out as
// ECMAScript defines it (see pcre_pattern); formats by hand-written checks of ajv-formats' rules.

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace m1::testing {

class SchemaValidator {
 public:
  using json = nlohmann::json;

  explicit SchemaValidator(json schema) : root_(std::move(schema)) {}

  // Empty when `document` (JSON text) parses and is valid; else why not.
  std::string check_text(const std::string& document) const {
    json value;
    try {
      value = json::parse(document);
    } catch (const std::exception& e) {
      return std::string("not JSON: ") + e.what();
    }
    return check(value);
  }

  std::string check(const json& value) const {
    std::string why;
    return valid(value, root_, "#", why, 0) ? std::string() : why;
  }

 private:
  bool invalid(std::string& why, const std::string& at, const std::string& message) const {
    why = at + ": " + message;
    return false;
  }

  const json& resolve(const std::string& ref) const {
    const json* at = &root_;
    size_t pos = 1;
    while (pos < ref.size()) {
      size_t end = ref.find('/', pos + 1);
      if (end == std::string::npos) end = ref.size();
      std::string token;  // with ~1 read as '/' and ~0 as '~'
      for (size_t i = pos + 1; i < end; ++i) {
        if (ref[i] == '~' && i + 1 < end && (ref[i + 1] == '0' || ref[i + 1] == '1')) {
          token += ref[i + 1] == '1' ? '/' : '~';
          ++i;
        } else {
          token += ref[i];
        }
      }
      at = at->is_array() ? &(*at)[std::stoul(token)] : &(*at)[token];
      pos = end;
    }
    return *at;
  }

  static bool is_integer(const json& v) {
    if (v.is_number_integer() || v.is_number_unsigned()) return true;
    return v.is_number_float() && std::floor(v.get<double>()) == v.get<double>();
  }

  static bool has_type(const json& v, const std::string& type) {
    if (type == "null") return v.is_null();
    if (type == "boolean") return v.is_boolean();
    if (type == "integer") return v.is_number() && is_integer(v);
    if (type == "number") return v.is_number();
    if (type == "string") return v.is_string();
    if (type == "array") return v.is_array();
    if (type == "object") return v.is_object();
    return false;
  }

  // Code points of valid UTF-8 (the parser has checked it).
  static int64_t length(const std::string& s) {
    int64_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
  }

  // An ECMAScript (ECMA-262, u flag) pattern in PCRE2's terms, where the two differ:
  // - the class escapes \d \D \w \W \s \S as the explicit sets ECMA-262 defines (PCRE2's \s lacks
  //   U+FEFF; in Unicode mode its \d and \w take other scripts' digits and letters; found by
  //   fuzz_json_schema), '.' as anything but a line terminator, \v as U+000B alone;
  // - \xHH, \uHHHH and \u{H...} as PCRE2's \x{...};
  // - the empty classes: [] matches nothing, (?!); [^] any character.
  static std::string class_escape(char letter) {
    switch (letter) {
      case 'd': return "0-9";
      case 'D': return "\\x{0}-\\x{2F}\\x{3A}-\\x{10FFFF}";
      case 'w': return "A-Za-z0-9_";
      case 'W': return "\\x{0}-\\x{2F}\\x{3A}-\\x{40}\\x{5B}-\\x{5E}\\x{60}\\x{7B}-\\x{10FFFF}";
      case 's':
        return "\\x{9}-\\x{D}\\x{20}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}"
               "\\x{3000}\\x{FEFF}";
      case 'S':
        return "\\x{0}-\\x{8}\\x{E}-\\x{1F}\\x{21}-\\x{9F}\\x{A1}-\\x{167F}\\x{1681}-\\x{1FFF}\\x{200B}-\\x{2027}"
               "\\x{202A}-\\x{202E}\\x{2030}-\\x{205E}\\x{2060}-\\x{2FFF}\\x{3001}-\\x{FEFE}\\x{FF00}-\\x{10FFFF}";
      default: return "";
    }
  }

  static std::string pcre_pattern(const std::string& pattern) {
    std::string out;
    bool in_class = false;
    const auto is_hex = [&](size_t at) { return at < pattern.size() && std::isxdigit(static_cast<unsigned char>(pattern[at])); };
    for (size_t i = 0; i < pattern.size(); ++i) {
      const char c = pattern[i];
      if (c == '\\' && i + 1 < pattern.size()) {
        const char letter = pattern[++i];
        const std::string set = class_escape(letter);
        if (!set.empty()) {
          out += in_class ? set : "[" + set + "]";
        } else if (letter == 'v') {
          out += "\\x{B}";
        } else if (letter == 'x' && is_hex(i + 1) && is_hex(i + 2)) {
          out += "\\x{" + pattern.substr(i + 1, 2) + "}";
          i += 2;
        } else if (letter == 'u' && i + 1 < pattern.size() && pattern[i + 1] == '{') {
          const size_t close = pattern.find('}', i);
          if (close == std::string::npos) return pattern;  // refused by PCRE2 as by m1
          out += "\\x{" + pattern.substr(i + 2, close - i - 2) + "}";
          i = close;
        } else if (letter == 'u' && is_hex(i + 1) && is_hex(i + 2) && is_hex(i + 3) && is_hex(i + 4)) {
          out += "\\x{" + pattern.substr(i + 1, 4) + "}";
          i += 4;
        } else {
          out += pattern.substr(i - 1, 2);
        }
      } else if (!in_class && c == '[' && pattern.compare(i, 2, "[]") == 0) {
        out += "(?!)";
        ++i;
      } else if (!in_class && c == '[' && pattern.compare(i, 3, "[^]") == 0) {
        out += "[\\x{0}-\\x{10FFFF}]";
        i += 2;
      } else if (!in_class && c == '.') {
        out += "[^\\n\\r\\x{2028}\\x{2029}]";
      } else {
        in_class = c == '[' ? true : c == ']' ? false : in_class;
        out += c;
      }
    }
    return out;
  }

  static bool matches(const std::string& ecma_pattern, const std::string& text) {
    const std::string pattern = pcre_pattern(ecma_pattern);
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(), PCRE2_UTF | PCRE2_DOLLAR_ENDONLY,
                                     &error, &offset, nullptr);
    if (code == nullptr) return false;
    pcre2_match_data* data = pcre2_match_data_create_from_pattern(code, nullptr);
    const int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(text.c_str()), text.size(), 0, 0, data, nullptr);
    pcre2_match_data_free(data);
    pcre2_code_free(code);
    return rc >= 0;
  }

  static bool digits(const std::string& s, size_t from, size_t count) {
    if (from + count > s.size()) return false;
    for (size_t i = from; i < from + count; ++i)
      if (s[i] < '0' || s[i] > '9') return false;
    return true;
  }
  static int number_at(const std::string& s, size_t from, size_t count) { return std::stoi(s.substr(from, count)); }

  static bool is_date(const std::string& s) {
    if (s.size() != 10 || !digits(s, 0, 4) || s[4] != '-' || !digits(s, 5, 2) || s[7] != '-' || !digits(s, 8, 2))
      return false;
    const int year = number_at(s, 0, 4), month = number_at(s, 5, 2), day = number_at(s, 8, 2);
    static const int days[] = {0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    const bool leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    return month >= 1 && month <= 12 && day >= 1 && day <= (month == 2 && leap ? 29 : days[month]);
  }

  // HH:MM:SS[.frac] then Z or +-HH:MM (required when `zone`).
  static bool is_time(const std::string& s, bool zone) {
    if (s.size() < 8 || !digits(s, 0, 2) || s[2] != ':' || !digits(s, 3, 2) || s[5] != ':' || !digits(s, 6, 2))
      return false;
    if (number_at(s, 0, 2) > 23 || number_at(s, 3, 2) > 59 || number_at(s, 6, 2) > 59) return false;
    size_t i = 8;
    if (i < s.size() && s[i] == '.') {
      const size_t start = ++i;
      while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
      if (i == start) return false;
    }
    if (i == s.size()) return !zone;
    if ((s[i] == 'Z' || s[i] == 'z') && i + 1 == s.size()) return true;
    if ((s[i] == '+' || s[i] == '-') && s.size() == i + 6 && digits(s, i + 1, 2) && s[i + 3] == ':' && digits(s, i + 4, 2))
      return number_at(s, i + 1, 2) <= 23 && number_at(s, i + 4, 2) <= 59;
    return false;
  }

  static bool is_uuid(const std::string& s) {
    if (s.size() != 36) return false;
    for (size_t i = 0; i < s.size(); ++i) {
      if (i == 8 || i == 13 || i == 18 || i == 23) {
        if (s[i] != '-') return false;
      } else if (!std::isxdigit(static_cast<unsigned char>(s[i]))) {
        return false;
      }
    }
    return true;
  }

  static bool is_email(const std::string& s) {
    const size_t at = s.find('@');
    if (at == std::string::npos || at == 0 || s.find('@', at + 1) != std::string::npos) return false;
    const std::string local = s.substr(0, at), domain = s.substr(at + 1);
    const std::string specials = "!#$%&'*+/=?^_`{|}~-";
    // dot-separated non-empty atoms
    size_t start = 0;
    for (size_t i = 0; i <= local.size(); ++i) {
      if (i == local.size() || local[i] == '.') {
        if (i == start) return false;
        start = i + 1;
      } else if (!std::isalnum(static_cast<unsigned char>(local[i])) && specials.find(local[i]) == std::string::npos) {
        return false;
      }
    }
    // at least two labels; each alphanumeric at both ends, hyphens inside
    int labels = 0;
    start = 0;
    for (size_t i = 0; i <= domain.size(); ++i) {
      if (i == domain.size() || domain[i] == '.') {
        const std::string label = domain.substr(start, i - start);
        if (label.empty() || label.front() == '-' || label.back() == '-') return false;
        for (char c : label)
          if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-') return false;
        ++labels;
        start = i + 1;
      }
    }
    return labels >= 2;
  }

  bool check_format(const std::string& format, const std::string& s) const {
    if (format == "date") return is_date(s);
    if (format == "time") return is_time(s, false);
    if (format == "date-time") {
      const size_t t = s.find_first_of("Tt ");
      return t != std::string::npos && is_date(s.substr(0, t)) && is_time(s.substr(t + 1), true);
    }
    if (format == "uuid") return is_uuid(s);
    if (format == "email") return is_email(s);
    return true;
  }

  bool valid(const json& v, const json& schema, const std::string& at, std::string& why, int depth) const {
    if (depth > 200) return invalid(why, at, "too deep");
    if (schema.is_boolean()) return schema.get<bool>() || invalid(why, at, "false schema");
    if (schema.contains("$ref")) {
      if (!valid(v, resolve(schema["$ref"].get<std::string>()), at, why, depth + 1)) return false;
    }
    if (schema.contains("type")) {
      const json& type = schema["type"];
      bool ok = false;
      if (type.is_string()) ok = has_type(v, type.get<std::string>());
      else for (const json& t : type) ok = ok || has_type(v, t.get<std::string>());
      if (!ok) return invalid(why, at, "wrong type: " + v.dump());
    }
    if (schema.contains("enum")) {
      bool found = false;
      for (const json& option : schema["enum"]) found = found || option == v;
      if (!found) return invalid(why, at, "not in enum: " + v.dump());
    }
    if (schema.contains("const") && schema["const"] != v) return invalid(why, at, "not the const: " + v.dump());
    if (v.is_number()) {
      const double x = v.get<double>();
      if (schema.contains("minimum") && x < schema["minimum"].get<double>()) return invalid(why, at, "below minimum");
      if (schema.contains("maximum") && x > schema["maximum"].get<double>()) return invalid(why, at, "above maximum");
      if (schema.contains("exclusiveMinimum") && x <= schema["exclusiveMinimum"].get<double>())
        return invalid(why, at, "not above exclusiveMinimum");
      if (schema.contains("exclusiveMaximum") && x >= schema["exclusiveMaximum"].get<double>())
        return invalid(why, at, "not below exclusiveMaximum");
    }
    if (v.is_string()) {
      const std::string& s = v.get_ref<const std::string&>();
      if (schema.contains("minLength") && length(s) < schema["minLength"].get<int64_t>()) return invalid(why, at, "too short");
      if (schema.contains("maxLength") && length(s) > schema["maxLength"].get<int64_t>()) return invalid(why, at, "too long");
      if (schema.contains("pattern") && !matches(schema["pattern"].get<std::string>(), s))
        return invalid(why, at, "does not match the pattern: " + v.dump());
      if (schema.contains("format") && !check_format(schema["format"].get<std::string>(), s))
        return invalid(why, at, "not a " + schema["format"].get<std::string>() + ": " + v.dump());
    }
    if (v.is_array()) {
      const int64_t n = int64_t(v.size());
      if (schema.contains("minItems") && n < schema["minItems"].get<int64_t>()) return invalid(why, at, "too few items");
      if (schema.contains("maxItems") && n > schema["maxItems"].get<int64_t>()) return invalid(why, at, "too many items");
      size_t prefix = 0;
      if (schema.contains("prefixItems")) {
        prefix = schema["prefixItems"].size();
        for (size_t i = 0; i < prefix && i < v.size(); ++i)
          if (!valid(v[i], schema["prefixItems"][i], at + "/" + std::to_string(i), why, depth + 1)) return false;
      }
      if (schema.contains("items"))
        for (size_t i = prefix; i < v.size(); ++i)
          if (!valid(v[i], schema["items"], at + "/" + std::to_string(i), why, depth + 1)) return false;
    }
    if (v.is_object()) {
      if (schema.contains("required"))
        for (const json& name : schema["required"])
          if (!v.contains(name.get<std::string>())) return invalid(why, at, "missing " + name.get<std::string>());
      const json properties = schema.value("properties", json::object());
      for (const auto& [key, item] : v.items()) {
        if (properties.contains(key)) {
          if (!valid(item, properties[key], at + "/" + key, why, depth + 1)) return false;
        } else if (schema.contains("additionalProperties")) {
          if (!valid(item, schema["additionalProperties"], at + "/" + key, why, depth + 1)) return false;
        }
      }
    }
    if (schema.contains("allOf"))
      for (const json& part : schema["allOf"])
        if (!valid(v, part, at, why, depth + 1)) return false;
    if (schema.contains("anyOf")) {
      bool any = false;
      std::string ignored;
      for (const json& part : schema["anyOf"]) any = any || valid(v, part, at, ignored, depth + 1);
      if (!any) return invalid(why, at, "matches no anyOf branch: " + v.dump());
    }
    if (schema.contains("oneOf")) {
      int count = 0;
      std::string ignored;
      for (const json& part : schema["oneOf"]) count += valid(v, part, at, ignored, depth + 1);
      if (count != 1) return invalid(why, at, "matches " + std::to_string(count) + " oneOf branches: " + v.dump());
    }
    return true;
  }

  json root_;
};

}  // namespace m1::testing
