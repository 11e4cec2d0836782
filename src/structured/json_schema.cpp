#include "structured/json_schema.h"

#include <algorithm>
#include <cmath>
#include <set>

#include <fmt/format.h>

#include "m1/chat.h"
#include "m1/error.h"
#include "structured/regex.h"

namespace m1::structured {

using ojson = nlohmann::ordered_json;

namespace {

enum TypeBits : uint8_t {
  kNull = 1,
  kBoolean = 2,
  kInteger = 4,
  kFraction = 8,  // numbers that are not integers
  kString = 16,
  kArray = 32,
  kObject = 64,
  kAnyType = 127,
};

uint8_t type_bit(const std::string& name) {
  if (name == "null") return kNull;
  if (name == "boolean") return kBoolean;
  if (name == "integer") return kInteger;
  if (name == "number") return kInteger | kFraction;
  if (name == "string") return kString;
  if (name == "array") return kArray;
  if (name == "object") return kObject;
  return 0;
}

uint8_t type_of(const ojson& value) {
  switch (value.type()) {
    case ojson::value_t::null: return kNull;
    case ojson::value_t::boolean: return kBoolean;
    case ojson::value_t::number_integer:
    case ojson::value_t::number_unsigned: return kInteger;
    case ojson::value_t::number_float: {
      const double v = value.get<double>();
      return std::isfinite(v) && std::floor(v) == v ? kInteger : kFraction;
    }
    case ojson::value_t::string: return kString;
    case ojson::value_t::array: return kArray;
    case ojson::value_t::object: return kObject;
    default: return 0;
  }
}

// Values compared as JSON compares them: key order aside, 1 equal to 1.0.
bool same_value(const ojson& a, const ojson& b) { return nlohmann::json(a) == nlohmann::json(b); }

bool spells_marker(std::string_view text) {
  return std::any_of(kMarkerText.begin(), kMarkerText.end(),
                     [&](std::string_view marker) { return text.find(marker) != std::string_view::npos; });
}

// Keywords that say nothing about which documents are valid.
const std::set<std::string>& annotations() {
  static const std::set<std::string> names = {
      "$schema", "$id", "$comment", "title", "description", "default", "examples", "deprecated",
      "readOnly", "writeOnly", "contentMediaType", "contentEncoding", "$defs", "definitions"};
  return names;
}

constexpr int64_t kMaxCount = 4096;  // the largest minItems/maxItems
constexpr int64_t kMaxLength = 10000;  // the largest minLength/maxLength
constexpr int kMaxDepth = 128;          // subschemas within subschemas

enum Skip : uint8_t { kSkipAnyOf = 1, kSkipOneOf = 2 };  // keywords already accounted for

// A schema object of the document, with keywords already accounted for elsewhere skipped.
struct Located {
  const ojson* node = nullptr;
  std::string path;
  uint8_t skip = 0;
  std::string key() const { return path + "|" + std::to_string(skip); }
};
using Parts = std::vector<Located>;  // all of them hold

enum class Extra { kAbsent, kAny, kNone, kSchema };

// The properties one part of a conjunction declares, and what it says of others.
struct ObjectPart {
  std::vector<std::string> names;
  Extra extra = Extra::kAbsent;
  Parts extra_schema;
};

struct Choice {
  std::vector<Parts> options;
  bool one_of = false;
  size_t part = 0;  // which part of the conjunction it belongs to
  std::string path;
};

// The conjunction of a schema's parts, keyword by keyword.
struct Schema {
  std::string path;  // of the first part, for messages
  bool never = false;
  std::string why_never;
  uint8_t types = kAnyType;
  std::optional<std::vector<ojson>> values;  // enum and const
  std::vector<std::string> constraints;      // constraining keywords seen, besides type, enum, const
  StringConstraints strings;
  std::optional<double> minimum, maximum, exclusive_minimum, exclusive_maximum;
  bool has_prefix = false;
  std::vector<Parts> prefix_items;
  std::optional<Parts> items;  // absent: any items
  bool items_never = false;
  int64_t min_items = 0, max_items = -1;
  std::vector<std::pair<std::string, Parts>> properties;
  std::vector<std::string> required;
  std::vector<ObjectPart> object_parts;
  Extra extra = Extra::kAbsent;
  Parts extra_schema;
  std::vector<Choice> choices;

  void set_never(std::string why) {
    if (!never) why_never = std::move(why);
    never = true;
  }
  Parts* property(const std::string& name) {
    for (auto& [key, parts] : properties)
      if (key == name) return &parts;
    return nullptr;
  }
};

}  // namespace

// Compiles one schema document.
class SchemaCompiler {
 public:
  SchemaCompiler(JsonGrammar& json, const ojson& root, std::string what)
      : json_(json), b_(json.b_), root_(root), what_(std::move(what)) {}

  int32_t compile_root() {
    const int32_t n = compile({Located{&root_, "#"}});
    if (!b_.derives_text(n)) {
      if (!first_why_.empty()) fail("{}: no JSON document satisfies it ({})", what_, first_why_);
      fail("{}: no JSON document satisfies it", what_);
    }
    return n;
  }

 private:
  [[noreturn]] void error(const std::string& path, const std::string& message) const {
    fail("{}: {}: {}", what_, path, message);
  }
  void note_never(const std::string& why) {
    if (first_why_.empty()) first_why_ = why;
  }

  // --- references and conjunctions ----------------------------------------------------------

  const ojson& resolve(const std::string& ref, const std::string& path) {
    if (ref.empty() || ref[0] != '#')
      error(path, fmt::format("$ref '{}': only references within the schema ('#...') are supported", ref));
    const ojson* at = &root_;
    std::string rest = ref.substr(1);
    if (!rest.empty() && rest[0] != '/') error(path, fmt::format("$ref '{}': anchors are not supported", ref));
    size_t pos = 0;
    while (pos < rest.size()) {
      const size_t end = std::min(rest.find('/', pos + 1), rest.size());
      std::string token = rest.substr(pos + 1, end - pos - 1);
      for (size_t i = 0; (i = token.find('~', i)) != std::string::npos; ++i) {
        if (i + 1 < token.size() && token[i + 1] == '1') token.replace(i, 2, "/");
        else if (i + 1 < token.size() && token[i + 1] == '0') token.replace(i, 2, "~");
      }
      if (at->is_object() && at->contains(token)) {
        at = &(*at)[token];
      } else if (at->is_array() && !token.empty() && std::all_of(token.begin(), token.end(), ::isdigit) &&
                 std::stoull(token) < at->size()) {
        at = &(*at)[std::stoull(token)];
      } else {
        error(path, fmt::format("$ref '{}': no such place in the schema", ref));
      }
      pos = end;
    }
    return *at;
  }

  // The parts with every $ref and allOf followed, each place once (its spent keywords merged), in
  // a fixed order.
  Parts expand(Parts parts) {
    std::map<std::string, size_t> index;  // path -> place in out
    Parts out;
    for (size_t i = 0; i < parts.size(); ++i) {
      const Located part = parts[i];
      if (const auto found = index.find(part.path); found != index.end()) {
        out[found->second].skip |= part.skip;
        continue;
      }
      index.emplace(part.path, out.size());
      out.push_back(part);
      const ojson& node = *part.node;
      if (!node.is_object()) continue;
      if (const auto ref = node.find("$ref"); ref != node.end()) {
        if (!ref->is_string()) error(part.path + "/$ref", "$ref must be a string");
        const std::string target = ref->get<std::string>();
        parts.push_back({&resolve(target, part.path + "/$ref"), target == "#" || target.empty() ? "#" : target, 0});
      }
      if (const auto all = node.find("allOf"); all != node.end()) {
        if (!all->is_array() || all->empty()) error(part.path + "/allOf", "allOf must be a non-empty array");
        for (size_t k = 0; k < all->size(); ++k)
          parts.push_back({&(*all)[k], fmt::format("{}/allOf/{}", part.path, k), 0});
      }
    }
    std::sort(out.begin(), out.end(), [](const Located& a, const Located& b) { return a.path < b.path; });
    return out;
  }

  static std::string key_of(const Parts& expanded) {
    std::string key;
    for (const Located& part : expanded) key += part.key() + ";";
    return key;
  }

  int32_t compile(const Parts& parts) {
    struct Depth {
      int& depth;
      explicit Depth(int& d) : depth(d) { ++depth; }
      ~Depth() { --depth; }
    } nested(depth_);
    if (depth_ > kMaxDepth) error(parts.empty() ? "#" : parts[0].path, fmt::format("nests deeper than {} levels", kMaxDepth));
    const Parts expanded = expand(parts);
    const std::string key = key_of(expanded);
    if (const auto found = memo_.find(key); found != memo_.end()) return found->second;
    const int32_t n = b_.nonterminal(expanded.empty() ? "#" : expanded[0].path);
    memo_.emplace(key, n);
    Schema s = parse(expanded);
    if (!s.choices.empty()) {
      expand_choice(n, expanded, s.choices[0]);
    } else if (s.never) {
      note_never(s.why_never);
    } else {
      build(n, s);
    }
    return n;
  }

  // One production per option: the conjunction with the choice's keyword spent and the option added.
  void expand_choice(int32_t n, const Parts& expanded, const Choice& choice) {
    std::vector<Parts> options;
    for (const Parts& option : choice.options) {
      Parts with = expanded;
      with[choice.part].skip |= choice.one_of ? kSkipOneOf : kSkipAnyOf;
      with.insert(with.end(), option.begin(), option.end());
      options.push_back(std::move(with));
    }
    if (choice.one_of) check_disjoint(options, choice.path);
    for (const Parts& option : options) b_.production(n, {compile(option)});
  }

  // --- parsing keywords ----------------------------------------------------------------------

  Schema parse(const Parts& expanded) {
    Schema s;
    s.path = expanded.empty() ? "#" : expanded[0].path;
    for (size_t i = 0; i < expanded.size(); ++i) parse_part(s, expanded[i], i);
    finish_objects(s);
    if (s.min_items > s.max_items && s.max_items >= 0)
      s.set_never(fmt::format("{}: minItems {} is more than maxItems {}", s.path, s.min_items, s.max_items));
    return s;
  }

  int64_t count(const ojson& value, const std::string& path, const char* keyword, int64_t limit) {
    if (!value.is_number_integer() && !(value.is_number_float() && type_of(value) == kInteger))
      error(path, fmt::format("{} must be a non-negative integer", keyword));
    const double v = value.get<double>();
    if (v < 0) error(path, fmt::format("{} must be a non-negative integer", keyword));
    if (v > double(limit)) error(path, fmt::format("{} above {} is not supported", keyword, limit));
    return int64_t(v);
  }

  Parts subschema(const ojson& value, const std::string& path) {
    if (!value.is_object() && !value.is_boolean()) error(path, "a schema must be an object or a boolean");
    return {Located{&value, path}};
  }

  void parse_part(Schema& s, const Located& part, size_t index) {
    const ojson& node = *part.node;
    const std::string& path = part.path;
    if (node.is_boolean()) {
      if (!node.get<bool>()) s.set_never(fmt::format("{} is false", path));
      return;
    }
    if (!node.is_object()) error(path, "a schema must be an object or a boolean");
    ObjectPart object_part;
    bool object_keywords = false;
    for (const auto& [keyword, value] : node.items()) {
      const std::string at = path + "/" + keyword;
      if (annotations().count(keyword) || keyword == "$ref" || keyword == "allOf") continue;
      if (keyword == "type") {
        uint8_t types = 0;
        const auto add = [&](const ojson& name) {
          if (!name.is_string() || type_bit(name.get<std::string>()) == 0)
            error(at, "type must be one of null, boolean, integer, number, string, array, object, or a list of them");
          types |= type_bit(name.get<std::string>());
        };
        if (value.is_array()) {
          if (value.empty()) error(at, "type must not be an empty list");
          for (const ojson& name : value) add(name);
        } else {
          add(value);
        }
        s.types &= types;
        if (s.types == 0) s.set_never(fmt::format("{}: the types allowed leave none", at));
      } else if (keyword == "enum" || keyword == "const") {
        std::vector<ojson> values;
        if (keyword == "const") {
          values.push_back(value);
        } else {
          if (!value.is_array()) error(at, "enum must be an array");
          values.assign(value.begin(), value.end());
        }
        if (s.values) {
          std::erase_if(values, [&](const ojson& v) {
            return std::none_of(s.values->begin(), s.values->end(), [&](const ojson& w) { return same_value(v, w); });
          });
        }
        s.values = std::move(values);
        if (s.values->empty()) s.set_never(fmt::format("{}: no value is left", at));
      } else if (keyword == "minLength" || keyword == "maxLength") {
        const int64_t n = count(value, at, keyword.c_str(), kMaxLength);
        s.constraints.push_back(keyword);
        if (keyword == "minLength") s.strings.min_length = std::max(s.strings.min_length, n);
        else s.strings.max_length = s.strings.max_length < 0 ? n : std::min(s.strings.max_length, n);
      } else if (keyword == "pattern") {
        if (!value.is_string()) error(at, "pattern must be a string");
        try {
          parse_pattern(value.get<std::string>());
        } catch (const Error& e) {
          error(at, e.what());
        }
        s.constraints.push_back(keyword);
        s.strings.patterns.push_back(value.get<std::string>());
      } else if (keyword == "format") {
        if (!value.is_string()) error(at, "format must be a string");
        const std::string format = value.get<std::string>();
        if (!is_supported_format(format))
          error(at, fmt::format("format '{}' is not supported (supported: {})", format, kSupportedFormats));
        s.constraints.push_back(keyword);
        if (s.strings.format && *s.strings.format != format)
          error(at, "two different formats for one string are not supported");
        s.strings.format = format;
      } else if (keyword == "minimum" || keyword == "maximum" || keyword == "exclusiveMinimum" ||
                 keyword == "exclusiveMaximum") {
        if (!value.is_number()) error(at, fmt::format("{} must be a number", keyword));
        const double v = value.get<double>();
        s.constraints.push_back(keyword);
        auto& slot = keyword == "minimum" ? s.minimum : keyword == "maximum" ? s.maximum
                     : keyword == "exclusiveMinimum" ? s.exclusive_minimum : s.exclusive_maximum;
        const bool lower = keyword == "minimum" || keyword == "exclusiveMinimum";
        slot = !slot ? v : lower ? std::max(*slot, v) : std::min(*slot, v);
      } else if (keyword == "items") {
        if (value.is_array()) error(at, "items as an array (draft 4 tuples) is not supported: use prefixItems");
        s.constraints.push_back(keyword);
        if (value.is_boolean() && !value.get<bool>()) {
          s.items_never = true;
        } else {
          Parts items = subschema(value, at);
          if (s.items) s.items->insert(s.items->end(), items.begin(), items.end());
          else s.items = std::move(items);
        }
      } else if (keyword == "prefixItems") {
        if (!value.is_array()) error(at, "prefixItems must be an array of schemas");
        if (s.has_prefix) error(at, "prefixItems in several parts of an allOf is not supported");
        s.constraints.push_back(keyword);
        s.has_prefix = true;
        for (size_t i = 0; i < value.size(); ++i)
          s.prefix_items.push_back(subschema(value[i], fmt::format("{}/{}", at, i)));
      } else if (keyword == "minItems" || keyword == "maxItems") {
        const int64_t n = count(value, at, keyword.c_str(), kMaxCount);
        s.constraints.push_back(keyword);
        if (keyword == "minItems") s.min_items = std::max(s.min_items, n);
        else s.max_items = s.max_items < 0 ? n : std::min(s.max_items, n);
      } else if (keyword == "uniqueItems") {
        if (!value.is_boolean()) error(at, "uniqueItems must be a boolean");
        if (value.get<bool>()) error(at, "uniqueItems: true is not supported");
      } else if (keyword == "properties") {
        if (!value.is_object()) error(at, "properties must be an object");
        s.constraints.push_back(keyword);
        object_keywords = true;
        for (const auto& [name, property] : value.items()) {
          Parts parts = subschema(property, at + "/" + name);
          object_part.names.push_back(name);
          if (Parts* existing = s.property(name)) existing->insert(existing->end(), parts.begin(), parts.end());
          else s.properties.emplace_back(name, std::move(parts));
        }
      } else if (keyword == "required") {
        if (!value.is_array()) error(at, "required must be an array of strings");
        s.constraints.push_back(keyword);
        for (const ojson& name : value) {
          if (!name.is_string()) error(at, "required must be an array of strings");
          if (std::find(s.required.begin(), s.required.end(), name.get<std::string>()) == s.required.end())
            s.required.push_back(name.get<std::string>());
        }
      } else if (keyword == "additionalProperties") {
        s.constraints.push_back(keyword);
        object_keywords = true;
        if (value.is_boolean()) {
          object_part.extra = value.get<bool>() ? Extra::kAny : Extra::kNone;
        } else {
          object_part.extra = Extra::kSchema;
          object_part.extra_schema = subschema(value, at);
        }
      } else if (keyword == "anyOf" || keyword == "oneOf") {
        const bool one_of = keyword == "oneOf";
        if ((part.skip & (one_of ? kSkipOneOf : kSkipAnyOf)) != 0) continue;
        if (!value.is_array() || value.empty()) error(at, fmt::format("{} must be a non-empty array", keyword));
        s.constraints.push_back(keyword);
        Choice choice{{}, one_of, index, at};
        for (size_t i = 0; i < value.size(); ++i) choice.options.push_back(subschema(value[i], fmt::format("{}/{}", at, i)));
        s.choices.push_back(std::move(choice));
      } else {
        error(at, fmt::format("unsupported keyword '{}'", keyword));
      }
    }
    if (object_keywords) s.object_parts.push_back(std::move(object_part));
  }

  // allOf of objects: a part with additionalProperties false (or a schema) restricts the
  // properties the other parts declare too.
  void finish_objects(Schema& s) {
    std::set<std::string> forbidden;
    bool any_none = false;
    for (const ObjectPart& part : s.object_parts) {
      if (part.extra == Extra::kAbsent || part.extra == Extra::kAny) continue;
      for (auto& [name, parts] : s.properties) {
        if (std::find(part.names.begin(), part.names.end(), name) != part.names.end()) continue;
        if (part.extra == Extra::kNone) forbidden.insert(name);
        else parts.insert(parts.end(), part.extra_schema.begin(), part.extra_schema.end());
      }
      if (part.extra == Extra::kNone) any_none = true;
      else s.extra_schema.insert(s.extra_schema.end(), part.extra_schema.begin(), part.extra_schema.end());
    }
    std::erase_if(s.properties, [&](const auto& property) { return forbidden.count(property.first) > 0; });
    for (const ObjectPart& part : s.object_parts)
      if (part.extra == Extra::kAny && s.extra == Extra::kAbsent) s.extra = Extra::kAny;
    if (!s.extra_schema.empty()) s.extra = Extra::kSchema;
    if (any_none) s.extra = Extra::kNone;
    for (const std::string& name : s.required) {
      if (forbidden.count(name) || (s.extra == Extra::kNone && !s.property(name))) {
        if (s.types & kObject) {
          s.types &= uint8_t(~kObject);
          note_never(fmt::format("{}: required property '{}' is not allowed by additionalProperties", s.path, name));
          if (s.types == 0) s.set_never(first_why_);
        }
      }
    }
  }

  // --- building rules ------------------------------------------------------------------------

  void build(int32_t n, Schema& s) {
    if (s.values) {
      build_values(n, s);
      return;
    }
    const std::string& at = s.path;
    if (s.types & kNull) b_.production(n, {terminal_symbol(b_.literal("null"))});
    if (s.types & kBoolean) {
      b_.production(n, {terminal_symbol(b_.literal("true"))});
      b_.production(n, {terminal_symbol(b_.literal("false"))});
    }
    if (s.types & (kInteger | kFraction)) build_number(n, s);
    if (s.types & kString) {
      const int32_t t = json_.string_terminal(s.strings, what_ + ": " + at);
      if (t >= 0) b_.production(n, {terminal_symbol(t)});
      else note_never(fmt::format("{}: no string satisfies its length, pattern and format together", at));
    }
    if (s.types & kArray) build_array(n, s);
    if (s.types & kObject) build_object(n, s);
  }

  void build_values(int32_t n, const Schema& s) {
    for (const std::string& keyword : s.constraints)
      if (keyword != "anyOf" && keyword != "oneOf")
        error(s.path, fmt::format("enum or const together with {} is not supported", keyword));
    size_t written = 0;
    for (const ojson& value : *s.values) {
      if (!(type_of(value) & s.types)) continue;
      const std::string text = JsonGrammar::dump(value);
      if (spells_marker(text)) {
        note_never(fmt::format("{}: a value spells a marker token's text, which output cannot hold", s.path));
        continue;
      }
      b_.production(n, {terminal_symbol(b_.literal(text))});
      ++written;
    }
    if (written == 0) note_never(fmt::format("{}: no value of enum/const has an allowed type", s.path));
  }

  std::optional<int64_t> integer_bound(double value, bool lower, bool exclusive, const std::string& path,
                                       const char* keyword) {
    double bound = lower ? (exclusive ? std::floor(value) + 1 : std::ceil(value))
                         : (exclusive ? std::ceil(value) - 1 : std::floor(value));
    if (!(bound >= -9.2e18 && bound <= 9.2e18)) error(path, fmt::format("{} beyond the 64-bit integer range is not supported", keyword));
    return int64_t(bound);
  }

  void build_number(int32_t n, const Schema& s) {
    const bool integer = !(s.types & kFraction);
    IntegerBounds bounds;
    const auto tighten = [](std::optional<int64_t>& slot, std::optional<int64_t> v, bool lower) {
      if (v) slot = !slot ? v : lower ? std::max(*slot, *v) : std::min(*slot, *v);
    };
    const std::string& at = s.path;
    if (!integer) {
      for (const auto& [value, name] : {std::pair{s.exclusive_minimum, "exclusiveMinimum"}, {s.exclusive_maximum, "exclusiveMaximum"}})
        if (value) error(at, fmt::format("{} is supported for integers only (type: integer)", name));
      for (const auto& [value, name] : {std::pair{s.minimum, "minimum"}, {s.maximum, "maximum"}})
        if (value && std::floor(*value) != *value)
          error(at, fmt::format("{} {} on a number is not supported: bounds of numbers must be integers", name, *value));
    }
    if (s.minimum) tighten(bounds.min, integer_bound(*s.minimum, true, false, at, "minimum"), true);
    if (s.exclusive_minimum) tighten(bounds.min, integer_bound(*s.exclusive_minimum, true, true, at, "exclusiveMinimum"), true);
    if (s.maximum) tighten(bounds.max, integer_bound(*s.maximum, false, false, at, "maximum"), false);
    if (s.exclusive_maximum) tighten(bounds.max, integer_bound(*s.exclusive_maximum, false, true, at, "exclusiveMaximum"), false);
    if (bounds.min && bounds.max && *bounds.min > *bounds.max) {
      note_never(fmt::format("{}: the minimum is above the maximum", at));
      return;
    }
    b_.production(n, {terminal_symbol(json_.number_terminal(integer, bounds))});
  }

  void build_array(int32_t n, const Schema& s) {
    const int32_t open = terminal_symbol(b_.literal("[")), close = terminal_symbol(b_.literal("]"));
    const int32_t comma = terminal_symbol(json_.comma());
    const int64_t prefix = int64_t(s.prefix_items.size());
    int64_t max = s.max_items;
    if (s.items_never) max = max < 0 ? prefix : std::min(max, prefix);
    if (max >= 0 && s.min_items > max) {
      note_never(fmt::format("{}: minItems {} cannot be met", s.path, s.min_items));
      return;
    }
    std::vector<int32_t> elements;  // element j's nonterminal, for j up to the first repeated one
    const auto element = [&](int64_t j) {
      while (int64_t(elements.size()) <= j) {
        const int64_t k = int64_t(elements.size());
        elements.push_back(k < prefix ? compile(s.prefix_items[size_t(k)]) : s.items ? compile(*s.items) : json_.any_value());
      }
      return elements[size_t(j)];
    };
    if (s.min_items == 0) b_.production(n, {open, close});
    // seq[j]: exactly j elements.
    const int64_t fixed = max >= 0 ? max : std::max({prefix, s.min_items, int64_t(1)});
    int32_t previous = -1;
    for (int64_t j = 1; j <= fixed; ++j) {
      const int32_t seq = b_.nonterminal(fmt::format("{}[{}]", s.path, j));
      if (j == 1) b_.production(seq, {element(0)});
      else b_.production(seq, {previous, comma, element(j - 1)});
      previous = seq;
      if (j >= s.min_items && (max >= 0 || j < fixed)) b_.production(n, {open, seq, close});
    }
    if (max < 0) {  // then any number of items more, left-recursive
      const int32_t list = b_.nonterminal(fmt::format("{}[{}+]", s.path, fixed));
      b_.production(list, {previous});
      b_.production(list, {list, comma, element(fixed)});
      b_.production(n, {open, list, close});
    }
  }

  void build_object(int32_t n, Schema& s) {
    // Declared properties in order, then required ones declared nowhere; then others if allowed.
    const bool others_allowed =
        s.extra == Extra::kAny || s.extra == Extra::kSchema || (s.extra == Extra::kAbsent && s.properties.empty());
    std::vector<std::pair<std::string, Parts>> declared;
    std::vector<char> required;
    for (auto& [name, parts] : s.properties) declared.emplace_back(name, parts);
    for (const std::string& name : s.required)
      if (!s.property(name)) declared.emplace_back(name, s.extra == Extra::kSchema ? s.extra_schema : Parts{});
    std::vector<std::string> names;
    for (const auto& [name, parts] : declared) {
      names.push_back(name);
      required.push_back(std::find(s.required.begin(), s.required.end(), name) != s.required.end());
    }
    const int32_t comma = terminal_symbol(json_.comma()), colon = terminal_symbol(json_.colon());
    // A property whose key cannot be written, or whose value nothing satisfies, may only be left out.
    const size_t count = declared.size();
    std::vector<int32_t> member(count, -1);
    for (size_t i = 0; i < count; ++i) {
      const std::string key = JsonGrammar::dump(ojson(names[i]));
      if (spells_marker(key)) {
        note_never(fmt::format("{}: property '{}' spells a marker token's text, which output cannot hold", s.path, names[i]));
        continue;
      }
      const int32_t value = declared[i].second.empty() ? json_.any_value() : compile(declared[i].second);
      member[i] = b_.nonterminal(fmt::format("{}.{}", s.path, names[i]));
      b_.production(member[i], {terminal_symbol(b_.literal(key)), colon, value});
    }
    // first[i]: properties i.. with none written yet; rest[i]: the same after one was.
    std::vector<int32_t> first(count + 1), rest(count + 1);
    for (size_t i = 0; i <= count; ++i) {
      first[i] = b_.nonterminal(fmt::format("{}{{{}", s.path, i));
      rest[i] = b_.nonterminal(fmt::format("{}{{{}+", s.path, i));
    }
    b_.production(first[count], {});
    b_.production(rest[count], {});
    if (others_allowed) {
      const int32_t key = terminal_symbol(json_.other_key_terminal(names));
      const int32_t value = s.extra == Extra::kSchema ? compile(s.extra_schema) : json_.any_value();
      const int32_t other = b_.nonterminal(s.path + ".*");
      b_.production(other, {key, colon, value});
      const int32_t others = b_.nonterminal(s.path + ".**");
      b_.production(others, {other});
      b_.production(others, {others, comma, other});
      b_.production(first[count], {others});
      b_.production(rest[count], {comma, others});
    }
    for (size_t i = count; i-- > 0;) {
      if (member[i] >= 0) {
        b_.production(first[i], {member[i], rest[i + 1]});
        b_.production(rest[i], {comma, member[i], rest[i + 1]});
      }
      if (!required[i]) {
        b_.production(first[i], {first[i + 1]});
        b_.production(rest[i], {rest[i + 1]});
      } else if (member[i] < 0) {
        note_never(fmt::format("{}: required property '{}' cannot be written", s.path, names[i]));
      }
    }
    b_.production(n, {terminal_symbol(b_.literal("{")), first[0], terminal_symbol(b_.literal("}"))});
  }

  // --- oneOf ---------------------------------------------------------------------------------

  void check_disjoint(const std::vector<Parts>& options, const std::string& path) {
    std::vector<Schema> shapes;
    for (const Parts& option : options) shapes.push_back(parse(expand(option)));
    for (size_t i = 0; i < shapes.size(); ++i)
      for (size_t j = i + 1; j < shapes.size(); ++j)
        if (!disjoint(shapes[i], shapes[j], 0))
          error(path, fmt::format("oneOf: branches {} and {} may both match one document; only branches that "
                                  "exclude each other are supported (different types, different const or enum "
                                  "values, or a required property that tells them apart): use anyOf",
                                  i, j));
  }

  static bool disjoint_values(const std::vector<ojson>& a, uint8_t types) {
    return std::none_of(a.begin(), a.end(), [&](const ojson& v) { return (type_of(v) & types) != 0; });
  }

  bool disjoint(Schema& a, Schema& b, int depth) {
    if (a.never || b.never) return true;
    const uint8_t common = a.types & b.types;
    if (common == 0) return true;
    if (a.values && disjoint_values(*a.values, b.types)) return true;
    if (b.values && disjoint_values(*b.values, a.types)) return true;
    if (a.values && b.values) {
      const bool shared = std::any_of(a.values->begin(), a.values->end(), [&](const ojson& v) {
        return std::any_of(b.values->begin(), b.values->end(), [&](const ojson& w) { return same_value(v, w); });
      });
      if (!shared) return true;
    }
    if (common != kObject || depth > 8) return false;
    for (const std::string& name : a.required) {
      const bool b_requires = std::find(b.required.begin(), b.required.end(), name) != b.required.end();
      if (!b.property(name) && b.extra == Extra::kNone) return true;  // a needs it, b forbids it
      if (!b_requires || !a.property(name) || !b.property(name)) continue;
      Schema pa = parse(expand(*a.property(name))), pb = parse(expand(*b.property(name)));
      if (disjoint(pa, pb, depth + 1)) return true;
    }
    for (const std::string& name : b.required)
      if (!a.property(name) && a.extra == Extra::kNone) return true;
    return false;
  }

  JsonGrammar& json_;
  GrammarBuilder& b_;
  const ojson& root_;
  std::string what_;
  std::map<std::string, int32_t> memo_;
  std::string first_why_;
  int depth_ = 0;  // of compile() calls
};

int32_t JsonGrammar::schema(const ojson& schema, const std::string& what) {
  return SchemaCompiler(*this, schema, what).compile_root();
}

std::string JsonGrammar::dump(const ojson& value) { return python_json_dumps(value); }

int32_t JsonGrammar::string_terminal(const StringConstraints& c, const std::string& where) {
  std::string key = fmt::format("s{}|{}|{}", c.min_length, c.max_length, c.format.value_or(""));
  for (const std::string& p : c.patterns) key += "|" + p;
  if (const auto found = terminals_.find(key); found != terminals_.end()) return found->second;
  const CharNfa content = string_language(c, where.c_str());
  const int32_t t = is_empty(content) ? -1 : quoted_terminal(content, "string");
  terminals_.emplace(key, t);
  return t;
}

int32_t JsonGrammar::quoted_terminal(const CharNfa& content, const char* name) {
  ByteNfa& nfa = b_.nfa();
  const ByteFragment open = add_bytes(nfa, "\"");
  const ByteFragment body = add_spelled(nfa, content, Spelling::kJsonString);
  const ByteFragment close = add_bytes(nfa, "\"");
  nfa.states[size_t(open.end)].eps.push_back(body.start);
  nfa.states[size_t(body.end)].eps.push_back(close.start);
  return b_.terminal(ByteFragment{open.start, close.end}, name);
}

int32_t JsonGrammar::number_terminal(bool integer, const IntegerBounds& bounds) {
  const std::string key = fmt::format("{}{}|{}", integer ? "i" : "n", bounds.min ? std::to_string(*bounds.min) : "",
                                      bounds.max ? std::to_string(*bounds.max) : "");
  if (const auto found = terminals_.find(key); found != terminals_.end()) return found->second;
  const RegexNode language = integer ? integer_language(bounds) : number_language(bounds);
  const int32_t t = b_.terminal(nfa_from_regex(language, "number"), Spelling::kUtf8, integer ? "integer" : "number");
  terminals_.emplace(key, t);
  return t;
}

int32_t JsonGrammar::other_key_terminal(const std::vector<std::string>& excluded) {
  std::string key = "k";
  for (const std::string& name : excluded) key += "|" + name;
  if (const auto found = terminals_.find(key); found != terminals_.end()) return found->second;
  // Keys without escapes, so the text is the key: a trie of the excluded names, leaving it at the
  // first character that no name continues with.
  const CodepointSet plain = CodepointSet::range(0x20, kMaxCodepoint).minus(CodepointSet::of('"')).minus(CodepointSet::of('\\'));
  CharNfa nfa;
  const int32_t free = nfa.add_state();  // diverged from every name
  nfa.states[size_t(free)].accept = true;
  nfa.states[size_t(free)].edges.push_back({plain, free});
  struct Node {
    std::map<char32_t, int32_t> children;
    bool word = false;
  };
  std::vector<Node> trie(1);
  for (const std::string& name : excluded) {
    size_t at = 0;
    for (char32_t c : decode_utf8(name, "property name")) {
      auto found = trie[at].children.find(c);
      if (found == trie[at].children.end()) {
        trie.emplace_back();
        found = trie[at].children.emplace(c, int32_t(trie.size() - 1)).first;
      }
      at = size_t(found->second);
    }
    trie[at].word = true;
  }
  std::vector<int32_t> state(trie.size());
  for (size_t i = 0; i < trie.size(); ++i) state[i] = nfa.add_state();
  nfa.start = state[0];
  for (size_t i = 0; i < trie.size(); ++i) {
    CharNfa::State& s = nfa.states[size_t(state[i])];
    s.accept = !trie[i].word;
    CodepointSet others = plain;
    for (const auto& [c, child] : trie[i].children) {
      others = others.minus(CodepointSet::of(c));
      nfa.states[size_t(state[i])].edges.push_back({CodepointSet::of(c), state[size_t(child)]});
    }
    if (!others.empty()) nfa.states[size_t(state[i])].edges.push_back({others, free});
  }
  const int32_t t = quoted_terminal(nfa, "key");
  terminals_.emplace(key, t);
  return t;
}

int32_t JsonGrammar::any_value() {
  if (any_value_ >= 0) return any_value_;
  any_value_ = b_.nonterminal("value");
  const int32_t value = any_value_;
  const int32_t separator = terminal_symbol(comma());
  const int32_t string = terminal_symbol(string_terminal({}, "string"));
  for (const char* word : {"null", "true", "false"}) b_.production(value, {terminal_symbol(b_.literal(word))});
  b_.production(value, {terminal_symbol(number_terminal(false, {}))});
  b_.production(value, {string});
  b_.production(value, {any_object()});
  const int32_t array = b_.nonterminal("array"), elements = b_.nonterminal("elements");
  const int32_t open = terminal_symbol(b_.literal("[")), close = terminal_symbol(b_.literal("]"));
  b_.production(array, {open, close});
  b_.production(array, {open, elements, close});
  b_.production(elements, {value});
  b_.production(elements, {elements, separator, value});
  b_.production(value, {array});
  return any_value_;
}

int32_t JsonGrammar::any_object() {
  if (any_object_ >= 0) return any_object_;
  any_object_ = b_.nonterminal("object");
  const int32_t value = any_value();
  const int32_t comma = terminal_symbol(this->comma()), colon = terminal_symbol(this->colon());
  const int32_t member = b_.nonterminal("member"), members = b_.nonterminal("members");
  const int32_t open = terminal_symbol(b_.literal("{")), close = terminal_symbol(b_.literal("}"));
  b_.production(member, {terminal_symbol(string_terminal({}, "string")), colon, value});
  b_.production(members, {member});
  b_.production(members, {members, comma, member});
  b_.production(any_object_, {open, close});
  b_.production(any_object_, {open, members, close});
  return any_object_;
}

}  // namespace m1::structured
