// m1-tokenize: text on stdin to token ids on stdout, or back with --decode, using a Hugging Face
// tokenizer.json. No special tokens are added; added tokens written in the text are matched
// unless --literal.

#include <cstdint>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "m1/error.h"
#include "m1/tokenizer.h"

namespace {

using nlohmann::json;

struct Options {
  std::string model_dir;
  std::string tokenizer_file;
  bool jsonl = false;
  bool decode = false;
  bool literal = false;
};

std::string read_stdin() {
  std::ostringstream text;
  text << std::cin.rdbuf();
  return std::move(text).str();
}

json parse_json(const std::string& text) {
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    m1::fail("not valid JSON: {}", e.what());
  }
}

std::vector<int32_t> parse_ids(const json& value, const m1::Tokenizer& tokenizer) {
  if (!value.is_array()) m1::fail("expected a JSON array of token ids");
  std::vector<int32_t> ids;
  for (const json& id : value) {
    if (!id.is_number_integer()) m1::fail("token id {} is not an integer", id.dump());
    if (id.get<int64_t>() < 0 || id.get<int64_t>() >= tokenizer.vocab_size()) {
      m1::fail("token id {} is out of range [0, {})", id.dump(), tokenizer.vocab_size());
    }
    ids.push_back(id.get<int32_t>());
  }
  return ids;
}

std::string encode_line(const std::string& line, const m1::Tokenizer& tokenizer,
                        m1::AddedTokens added) {
  const json text = parse_json(line);
  if (!text.is_string()) m1::fail("expected a JSON string");
  return json(tokenizer.encode(text.get_ref<const std::string&>(), added)).dump();
}

std::string decode_line(const std::string& line, const m1::Tokenizer& tokenizer) {
  return json(tokenizer.decode(parse_ids(parse_json(line), tokenizer))).dump();
}

// Converts stdin line by line; an error names its line.
template <class Convert>
void convert_lines(Convert&& convert) {
  std::string line;
  for (size_t number = 1; std::getline(std::cin, line); ++number) {
    try {
      std::cout << convert(line) << '\n';
    } catch (const m1::Error& e) {
      m1::fail("line {}: {}", number, e.what());
    }
  }
}

void run(const Options& options) {
  const std::filesystem::path path =
      options.tokenizer_file.empty() ? std::filesystem::path(options.model_dir) / "tokenizer.json"
                                     : std::filesystem::path(options.tokenizer_file);
  const m1::Tokenizer tokenizer = m1::Tokenizer::load(path);
  const m1::AddedTokens added =
      options.literal ? m1::AddedTokens::kLiteral : m1::AddedTokens::kMatch;
  if (options.jsonl && options.decode) {
    convert_lines([&](const std::string& line) { return decode_line(line, tokenizer); });
  } else if (options.jsonl) {
    convert_lines([&](const std::string& line) { return encode_line(line, tokenizer, added); });
  } else if (options.decode) {
    std::cout << tokenizer.decode(parse_ids(parse_json(read_stdin()), tokenizer));
  } else {
    std::cout << json(tokenizer.encode(read_stdin(), added)).dump() << '\n';
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "Encode the text on stdin to a JSON array of token ids, or decode ids back to text."};
  Options options;
  auto* model =
      app.add_option("--model", options.model_dir, "Model directory holding tokenizer.json");
  app.add_option("--tokenizer", options.tokenizer_file, "Path of a tokenizer.json")
      ->excludes(model);
  app.add_flag("--jsonl", options.jsonl, "One JSON string (or id array with --decode) per line");
  app.add_flag("--decode", options.decode, "Read JSON arrays of ids and write the text");
  app.add_flag("--literal", options.literal, "Encode added tokens in the text as plain text");
  try {
    app.parse(argc, argv);
    if (options.model_dir.empty() && options.tokenizer_file.empty()) {
      throw CLI::RequiredError("--model or --tokenizer");
    }
  } catch (const CLI::Success& e) {  // --help
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "m1-tokenize: " << e.what() << '\n';
    return 1;
  }
  std::ios::sync_with_stdio(false);
  try {
    run(options);
  } catch (const m1::Error& e) {
    std::cout.flush();
    std::cerr << "m1-tokenize: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
