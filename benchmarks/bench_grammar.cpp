// bench_grammar: the grammar engine's costs over a set of real-world JSON schemas
// (benchmarks/data/grammar_schemas.json, each with its source), at the real tokenizer's
// vocabulary of 200,064 tokens:
//   - compile time per schema (JSON Schema to grammar, the server's work per request);
//   - mask time per token: documents are decoded token by token, each token drawn at random among
//     those the mask allows (a third of the time among those holding '"', ',', ']' or '}', so that
//     strings and documents end about as often as a model's do), and every mask is timed in thread
//     CPU time (what the mask costs, whatever else the machine runs) and wall time, twice: as the
//     engine gets it (GrammarMatcher, which copies its last mask when a token leaves the matcher
//     in the same state, as inside a string), and worked out afresh every time. The first document
//     of each schema meets its lexer states for the first time ("cold"), the later ones find
//     them built ("warm");
//   - with --model DIR: decode tokens/s of the engine on that model with and without a schema,
//     request pairs interleaved (constrained, then unconstrained of the same length).
// Figures are medians and percentiles over everything measured; on a shared machine, compare
// medians.

#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "m1/backends.h"
#include "m1/engine.h"
#include "m1/error.h"
#include "m1/generation.h"
#include "m1/model.h"
#include "m1/structured_output.h"
#include "m1/tokenizer.h"
#include "structured/matcher.h"
#include "structured/token_mask.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using nlohmann::ordered_json;

namespace {

struct Options {
  fs::path schemas = fs::path(M1_SOURCE_DIR) / "benchmarks/data/grammar_schemas.json";
  fs::path tokenizer = fs::path(M1_SOURCE_DIR) / "data/minimax-m1/tokenizer.json";
  int documents = 3;   // per schema
  int max_tokens = 300;  // per document
  uint64_t seed = 1;
  fs::path model;  // for the decode comparison
  int decode_pairs = 8;
  int decode_tokens = 96;
  int threads = 0;
  std::string device = "cpu";
  fs::path json;
};

double thread_cpu_us() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) * 1e6 + double(t.tv_nsec) / 1e3;
}

double micros_since(Clock::time_point start) {
  return std::chrono::duration<double, std::micro>(Clock::now() - start).count();
}

// The value at fraction q of the sorted values.
double quantile(std::vector<double> values, double q) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  return values[std::min(values.size() - 1, size_t(q * double(values.size())))];
}

struct Summary {
  double median, p90, p99, max;
  size_t count;
};
Summary summarize(const std::vector<double>& values) {
  return {quantile(values, 0.5), quantile(values, 0.9), quantile(values, 0.99),
          values.empty() ? 0.0 : *std::max_element(values.begin(), values.end()), values.size()};
}

ordered_json as_json(const Summary& s) {
  return {{"median", s.median}, {"p90", s.p90}, {"p99", s.p99}, {"max", s.max}, {"count", s.count}};
}

std::shared_ptr<m1::OutputGrammar> compile(const ordered_json& schema, const std::string& name) {
  m1::OutputFormat format;
  format.document = m1::OutputFormat::Document::kSchema;
  format.schema = schema;
  format.schema_what = name;
  return m1::compile_output_grammar(format);
}

struct MaskTimes {
  std::vector<double> cpu_cold, cpu_warm, wall, accept, fresh;
  int finished = 0, documents = 0, tokens = 0;
};

// Tokens whose bytes hold '"', ',', ']' or '}': those that end strings, values and documents.
std::vector<char> structural_tokens(const m1::Tokenizer& tokenizer) {
  std::vector<char> structural(size_t(tokenizer.vocab_size()), 0);
  for (int32_t id = 0; id < tokenizer.vocab_size(); ++id) {
    try {
      const std::string& bytes = tokenizer.token_bytes(id);
      structural[size_t(id)] = bytes.find_first_of("\",]}") != std::string::npos;
    } catch (const m1::Error&) {
    }
  }
  return structural;
}

// One document of `grammar`, its masks timed into `times`.
void decode_document(const std::shared_ptr<m1::OutputGrammar>& grammar,
                     const std::shared_ptr<const m1::TokenVocabulary>& vocabulary, const m1::Tokenizer& tokenizer,
                     const std::vector<char>& structural, int32_t end_token, int max_tokens, bool cold,
                     std::mt19937_64& rng, MaskTimes& times) {
  m1::GrammarMatcher matcher(grammar, vocabulary);
  m1::structured::Matcher fresh(grammar);  // the same tokens, every mask worked out afresh
  std::vector<uint32_t> mask(size_t(vocabulary->words())), fresh_mask(mask.size());
  std::vector<int32_t> allowed, closing;
  const std::vector<int32_t> ends{end_token};
  ++times.documents;
  for (int step = 0; step < max_tokens; ++step) {
    if (matcher.must_end()) {
      ++times.finished;
      return;
    }
    const auto wall_start = Clock::now();
    const double cpu_start = thread_cpu_us();
    matcher.fill_mask(mask, ends);
    (cold ? times.cpu_cold : times.cpu_warm).push_back(thread_cpu_us() - cpu_start);
    times.wall.push_back(micros_since(wall_start));
    const double fresh_start = thread_cpu_us();
    m1::structured::fill_token_mask(fresh, vocabulary->index(), ends, fresh_mask);
    times.fresh.push_back(thread_cpu_us() - fresh_start);
    if (fresh_mask != mask) m1::fail("the mask worked out afresh differs from the engine's");
    ++times.tokens;
    allowed.clear();
    closing.clear();
    for (size_t w = 0; w < mask.size(); ++w)
      for (uint32_t bits = mask[w]; bits != 0; bits &= bits - 1) {
        const int32_t token = int32_t(w * 32 + size_t(__builtin_ctz(bits)));
        allowed.push_back(token);
        if (size_t(token) < structural.size() && structural[size_t(token)]) closing.push_back(token);
      }
    if (allowed.empty()) m1::fail("no token allowed: a dead end");
    const std::vector<int32_t>& from = !closing.empty() && rng() % 3 == 0 ? closing : allowed;
    int32_t id = from[rng() % from.size()];
    for (int tries = 0; tries < 6 && rng() % 2; ++tries) {
      const int32_t other = from[rng() % from.size()];
      if (other == end_token || tokenizer.token_bytes(other).size() < tokenizer.token_bytes(id).size()) id = other;
    }
    if (id == end_token) {
      ++times.finished;
      return;
    }
    const double accept_start = thread_cpu_us();
    if (!matcher.accept(id)) m1::fail("the matcher refused token {}, which its mask allowed", id);
    times.accept.push_back(thread_cpu_us() - accept_start);
    fresh.advance_bytes(tokenizer.token_bytes(id));
  }
}

// Decode tokens per second of one request: from its first token to its last.
struct Decoded {
  int64_t tokens = 0;
  double seconds = 0;
};
Decoded run_request(m1::Engine& engine, m1::GenerationRequest request) {
  auto stream = engine.submit(std::move(request));
  Decoded d;
  Clock::time_point first;
  for (;;) {
    auto event = stream->next(std::chrono::seconds(600));
    if (!event) m1::fail("decode: no event for 10 minutes");
    if (event->kind == m1::GenerationEvent::Kind::kToken) {
      if (d.tokens++ == 0) first = Clock::now();
      d.seconds = std::chrono::duration<double>(Clock::now() - first).count();
    }
    if (event->kind == m1::GenerationEvent::Kind::kFinish && !event->error.empty()) m1::fail("decode: {}", event->error);
    if (event->kind == m1::GenerationEvent::Kind::kDone) return d;
  }
}

ordered_json decode_comparison(const Options& o, const std::vector<std::pair<std::string, ordered_json>>& schemas) {
  auto backend = m1::create_backend(m1::BackendOptions{o.device, o.threads});
  auto model = m1::Model::load(o.model, *backend);
  const m1::Tokenizer tokenizer = m1::Tokenizer::load(o.model / "tokenizer.json");
  m1::Engine engine(*model, tokenizer, m1::EngineOptions{});
  const std::vector<int32_t> prompt = tokenizer.encode("Reply with a JSON document.");
  std::vector<double> constrained, free;
  for (int pair = 0; pair < o.decode_pairs; ++pair) {
    const auto& [name, schema] = schemas[size_t(pair) % schemas.size()];
    m1::GenerationRequest request;
    request.prompt = prompt;
    request.max_tokens = o.decode_tokens;
    request.sampling.temperature = 1.0f;
    request.sampling.seed = o.seed + uint64_t(pair);
    request.grammar = compile(schema, name);
    const Decoded with = run_request(engine, request);
    request.grammar = nullptr;
    request.max_tokens = std::max<int64_t>(with.tokens, 2);  // the same length, unconstrained
    const Decoded without = run_request(engine, request);
    if (with.tokens > 1) constrained.push_back(double(with.tokens - 1) / with.seconds);
    if (without.tokens > 1) free.push_back(double(without.tokens - 1) / without.seconds);
    fmt::print("  decode {:2d} {:28s} {:4d} tokens: {:7.2f} tokens/s with the schema, {:7.2f} without\n", pair, name,
               with.tokens, constrained.empty() ? 0.0 : constrained.back(), free.empty() ? 0.0 : free.back());
  }
  const double with = quantile(constrained, 0.5), without = quantile(free, 0.5);
  fmt::print("decode on {} ({}): median {:.2f} tokens/s with a schema, {:.2f} without: {:.3f}x\n", o.model.string(),
             o.device, with, without, with / without);
  return {{"model", o.model.string()}, {"device", o.device}, {"tokens_per_second_with_schema", with},
          {"tokens_per_second_without", without}, {"ratio", with / without}, {"pairs", o.decode_pairs}};
}

int run(const Options& o) {
  std::ifstream file(o.schemas);
  if (!file) m1::fail("--schemas: cannot read {}", o.schemas.string());
  const ordered_json set = ordered_json::parse(file);
  std::vector<std::pair<std::string, ordered_json>> schemas;
  for (const ordered_json& entry : set) schemas.emplace_back(entry.at("name").get<std::string>(), entry.at("schema"));

  const auto load_start = Clock::now();
  const m1::Tokenizer tokenizer = m1::Tokenizer::load(o.tokenizer);
  const double load_ms = micros_since(load_start) / 1e3;
  const auto index_start = Clock::now();
  const auto vocabulary = std::make_shared<const m1::TokenVocabulary>(tokenizer, 200064);
  const double index_ms = micros_since(index_start) / 1e3;
  const int32_t end_token = *tokenizer.token_id("<end_of_sentence>");
  fmt::print("tokenizer {} ({} tokens): loaded in {:.0f} ms, mask index built in {:.0f} ms\n", o.tokenizer.string(),
             tokenizer.vocab_size(), load_ms, index_ms);

  std::vector<double> compile_ms;
  MaskTimes times;
  const std::vector<char> structural = structural_tokens(tokenizer);
  std::mt19937_64 rng(o.seed);
  for (const auto& [name, schema] : schemas) {
    std::vector<double> runs;
    std::shared_ptr<m1::OutputGrammar> grammar;
    for (int r = 0; r < 5; ++r) {
      const auto start = Clock::now();
      grammar = compile(schema, name);
      runs.push_back(micros_since(start) / 1e3);
    }
    compile_ms.push_back(quantile(runs, 0.5));
    const size_t before = times.cpu_cold.size() + times.cpu_warm.size();
    for (int d = 0; d < o.documents; ++d)
      decode_document(grammar, vocabulary, tokenizer, structural, end_token, o.max_tokens, d == 0, rng, times);
    fmt::print("  {:28s} compile {:6.2f} ms, {:4d} masks\n", name, compile_ms.back(),
               times.cpu_cold.size() + times.cpu_warm.size() - before);
  }
  std::vector<double> all = times.cpu_cold;
  all.insert(all.end(), times.cpu_warm.begin(), times.cpu_warm.end());
  const Summary mask = summarize(all), cold = summarize(times.cpu_cold), warm = summarize(times.cpu_warm);
  const Summary wall = summarize(times.wall), accept = summarize(times.accept), compiled = summarize(compile_ms);
  const Summary fresh = summarize(times.fresh);
  fmt::print("\n{} schemas, {} documents ({} finished), {} tokens, vocabulary 200064\n", schemas.size(), times.documents,
             times.finished, times.tokens);
  fmt::print("{:34s} {:>9s} {:>9s} {:>9s} {:>9s}\n", "", "median", "p90", "p99", "max");
  const auto row = [](const char* what, const Summary& s, const char* unit) {
    fmt::print("{:34s} {:9.1f} {:9.1f} {:9.1f} {:9.1f} {}\n", what, s.median, s.p90, s.p99, s.max, unit);
  };
  row("mask per token (CPU time)", mask, "us");
  row("  first document of each schema", cold, "us");
  row("  later documents", warm, "us");
  row("mask per token (wall time)", wall, "us");
  row("mask worked out afresh (CPU time)", fresh, "us");
  row("accepting a token (CPU time)", accept, "us");
  fmt::print("{:34s} {:9.2f} {:9.2f} {:9.2f} {:9.2f} ms\n", "compile per schema", compiled.median, compiled.p90,
             compiled.p99, compiled.max);
  ordered_json report = {{"schemas", schemas.size()},
                         {"documents", times.documents},
                         {"finished", times.finished},
                         {"tokens", times.tokens},
                         {"vocabulary", 200064},
                         {"index_build_ms", index_ms},
                         {"mask_cpu_us", as_json(mask)},
                         {"mask_cpu_us_cold", as_json(cold)},
                         {"mask_cpu_us_warm", as_json(warm)},
                         {"mask_wall_us", as_json(wall)},
                         {"mask_fresh_cpu_us", as_json(fresh)},
                         {"accept_cpu_us", as_json(accept)},
                         {"compile_ms", as_json(compiled)}};
  if (!o.model.empty()) report["decode"] = decode_comparison(o, schemas);
  if (!o.json.empty()) std::ofstream(o.json) << report.dump(2) << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app("bench_grammar: compile and mask times of the grammar engine over real-world schemas");
  app.add_option("--schemas", o.schemas, "JSON list of {name, source, schema}");
  app.add_option("--tokenizer", o.tokenizer, "tokenizer.json (the real MiniMax-M1 tokenizer by default)");
  app.add_option("--documents", o.documents, "documents per schema")->check(CLI::Range(1, 100));
  app.add_option("--max-tokens", o.max_tokens, "tokens per document at most")->check(CLI::Range(1, 100000));
  app.add_option("--seed", o.seed, "random token choices");
  app.add_option("--model", o.model, "also compare decode tokens/s with and without a schema on this model");
  app.add_option("--decode-pairs", o.decode_pairs, "constrained and unconstrained requests, each")->check(CLI::Range(1, 1000));
  app.add_option("--decode-tokens", o.decode_tokens, "max_tokens of the constrained requests")->check(CLI::Range(2, 100000));
  app.add_option("--threads", o.threads, "CPU threads of the model (0: one per core)");
  app.add_option("--device", o.device, "cpu or cuda");
  app.add_option("--json", o.json, "write the figures here");
  CLI11_PARSE(app, argc, argv);
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_grammar: %s\n", e.what());
    return 1;
  }
}
