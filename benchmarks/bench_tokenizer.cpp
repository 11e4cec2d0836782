// Encode throughput of the MiniMax-M1 tokenizer on English prose, in bytes per second.

#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

#include <benchmark/benchmark.h>

#include "m1/tokenizer.h"

namespace {

const std::filesystem::path kTokenizerPath =
    std::filesystem::path(M1_SOURCE_DIR) / "data/minimax-m1/tokenizer.json";
const std::filesystem::path kProsePath = "/usr/share/common-licenses/GPL-3";  // 35 KB of English

std::string read_file(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + path.string());
  std::ostringstream text;
  text << file.rdbuf();
  return std::move(text).str();
}

const std::string& tokenizer_json() {
  static const std::string text = read_file(kTokenizerPath);
  return text;
}

const std::string& one_license() {
  static const std::string text = read_file(kProsePath);
  return text;
}

const std::string& four_megabytes_of_prose() {
  static const std::string text = [] {
    std::string prose;
    while (prose.size() < (4 << 20)) prose += one_license();
    return prose;
  }();
  return text;
}

m1::Tokenizer fresh_tokenizer() {
  return m1::Tokenizer::from_json(tokenizer_json(), kTokenizerPath.string());
}

// The steady state: every word of the text is already in the word cache.
void BM_EncodeWarm(benchmark::State& state) {
  const m1::Tokenizer tokenizer = fresh_tokenizer();
  const std::string& text = four_megabytes_of_prose();
  tokenizer.encode(text);
  for (auto _ : state) benchmark::DoNotOptimize(tokenizer.encode(text));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
}
BENCHMARK(BM_EncodeWarm)->Unit(benchmark::kMillisecond);

// A fresh tokenizer for each pass over one copy of the license, so its words are cached only by
// their own repetition within the document, as for a first request.
void BM_EncodeCold(benchmark::State& state) {
  const std::string& text = one_license();
  std::optional<m1::Tokenizer> tokenizer;
  for (auto _ : state) {
    state.PauseTiming();
    tokenizer.reset();
    tokenizer.emplace(fresh_tokenizer());
    state.ResumeTiming();
    benchmark::DoNotOptimize(tokenizer->encode(text));
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
}
BENCHMARK(BM_EncodeCold)->Iterations(10)->Unit(benchmark::kMillisecond);

void BM_Load(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(fresh_tokenizer());
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * tokenizer_json().size()));
}
BENCHMARK(BM_Load)->Iterations(5)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
