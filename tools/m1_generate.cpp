// m1-generate: one-shot generation from the command line, streamed to stdout.

#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "m1/backends.h"
#include "m1/chat.h"
#include "m1/error.h"
#include "m1/generation.h"
#include "m1/prefill.h"
#include "m1/state_snapshot.h"
#include "parallel_flags.h"

namespace fs = std::filesystem;

namespace {

struct Options {
  fs::path model;
  std::string prompt, chat, system, prompt_ids;
  m1::GenerationParams gen;
  std::optional<uint64_t> seed;
  int threads = 0;
  std::string device = "cpu", precision = "fast";
  fs::path logits_out;
  bool ignore_eos = false;
  m1::BackendOptions backend;
  m1::ParallelFlags parallel;
  fs::path prompt_cache;
  bool prompt_cache_ro = false;
  std::string quantize;
  int64_t group_size = 0;
  bool quantize_lm_head = false;
};

template <class... Args>
void note(fmt::format_string<Args...> format, Args&&... args) {
  std::fprintf(stderr, "m1-generate: %s\n", fmt::format(format, std::forward<Args>(args)...).c_str());
}

// --prompt-cache FILE, as llama.cpp's: the state after the prompt is saved to FILE, and a later
// prompt that starts with the saved one resumes from it. The state is saved at the last point
// where a resumed prefill gives the same numbers as a whole one (m1/prefill.h), so up to a few
// dozen of the prompt's last tokens are prefilled again. A file that cannot be used is ignored
// with a note (and replaced, unless --prompt-cache-ro).
m1::PromptReuse prompt_reuse(const Options& o, const m1::Model& model, std::span<const int32_t> prompt) {
  m1::PromptReuse reuse;
  const m1::SnapshotFormat format = m1::snapshot_format(model);
  int64_t resumed = 0;
  std::error_code ec;
  if (fs::exists(o.prompt_cache, ec)) {
    try {
      m1::SnapshotFileInfo info = m1::read_snapshot_info(o.prompt_cache, format);
      const size_t n = info.tokens.size();
      if (n < prompt.size() && std::equal(info.tokens.begin(), info.tokens.end(), prompt.begin())) {
        reuse.resume = m1::read_snapshot_state(o.prompt_cache, format, model, info);
        resumed = int64_t(n);
        note("prompt cache: resumed {} of {} prompt tokens from {}", n, prompt.size(), o.prompt_cache.string());
      } else {
        note("prompt cache: {} holds another prompt; prefilling all {} tokens", o.prompt_cache.string(), prompt.size());
      }
    } catch (const m1::SnapshotFileError& error) {
      note("prompt cache: {} not used: {}", o.prompt_cache.string(), error.what());
    }
  }
  const int64_t point = m1::last_snapshot_point(int64_t(prompt.size()), model.backend().prefill_alignment());
  if (o.prompt_cache_ro || point <= resumed) return reuse;
  reuse.snapshot_at = point;
  reuse.on_snapshot = [&o, format, prompt](const m1::SequenceState& state) {
    const m1::StateCopy copy = m1::copy_state(state);
    m1::write_snapshot_file(o.prompt_cache, format, "", prompt.first(size_t(copy.tokens)), copy.pieces());
    note("prompt cache: saved the state after {} prompt tokens to {}", copy.tokens, o.prompt_cache.string());
  };
  return reuse;
}

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
    }
    if (used == 0 || used != item.size() || v < 0 || v > INT32_MAX)
      m1::fail("--prompt-ids: '{}' is not a token id (expected comma-separated integers like 1,2,3)", item);
    ids.push_back(int32_t(v));
  }
  if (ids.empty()) m1::fail("--prompt-ids: no ids given");
  return ids;
}

std::vector<int32_t> prompt_tokens(const Options& o, const m1::Tokenizer& tokenizer, int64_t vocab) {
  if (!o.prompt_ids.empty()) {
    std::vector<int32_t> ids = parse_ids(o.prompt_ids);
    for (int32_t id : ids)
      if (id >= vocab) m1::fail("--prompt-ids: id {} is out of range for a vocabulary of {}", id, vocab);
    return ids;
  }
  if (!o.chat.empty()) {
    std::vector<m1::ChatMessage> messages;
    if (!o.system.empty()) messages.push_back(m1::ChatMessage{"system", o.system, {}, {}, {}});
    messages.push_back(m1::ChatMessage{"user", o.chat, {}, {}, {}});
    return m1::encode_chat(tokenizer, m1::render_chat(messages, {}, true));
  }
  return tokenizer.encode(o.prompt);
}

void write_logits(const fs::path& path, const std::vector<float>& logits) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logits.size() * sizeof(float)));
  if (!out.flush()) m1::fail("--logits-out: cannot write {}", path.string());
}

int run(Options& o) {
  int given = int(!o.prompt.empty()) + int(!o.chat.empty()) + int(!o.prompt_ids.empty());
  if (given != 1) m1::fail("give exactly one of --prompt, --chat or --prompt-ids");
  if (!o.system.empty() && o.chat.empty()) m1::fail("--system needs --chat");

  o.backend.device = o.device;
  o.backend.threads = o.threads;
  o.backend.precision = m1::parse_precision(o.precision);
  m1::LoadOptions load = m1::parse_load_options(o.quantize, o.group_size, o.quantize_lm_head, o.threads);
  o.parallel.apply(o.backend, load.shard);
  const auto backends = m1::create_backends(o.backend);
  auto model = m1::Model::load(o.model, m1::rank_pointers(backends), load);
  m1::Tokenizer tokenizer = m1::Tokenizer::load(o.model / "tokenizer.json");
  if (!o.ignore_eos) o.gen.end_tokens = {m1::end_of_turn_token(o.model, tokenizer)};
  std::vector<int32_t> prompt = prompt_tokens(o, tokenizer, model->config().vocab_size);
  o.gen.sampling.seed = o.seed ? *o.seed : std::random_device{}();
  if (o.prompt_cache_ro && o.prompt_cache.empty()) m1::fail("--prompt-cache-ro needs --prompt-cache");
  if (!o.prompt_cache.empty() && !o.logits_out.empty())
    m1::fail("--logits-out writes every prompt position's logits, which --prompt-cache skips: give one of them");
  m1::PromptReuse reuse;
  if (!o.prompt_cache.empty()) reuse = prompt_reuse(o, *model, prompt);

  m1::GenerationResult r = m1::generate(*model, tokenizer, prompt, o.gen, [](std::string_view text) {
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  }, !o.logits_out.empty(), &reuse);
  std::fputc('\n', stdout);
  if (!o.logits_out.empty()) write_logits(o.logits_out, r.prompt_logits);

  const size_t decoded = r.tokens.empty() ? 0 : r.tokens.size() - 1;  // the first came from prefill
  std::fprintf(stderr,
               "m1-generate: %s | prompt %zu tokens, prefill %.3f s (%.1f tok/s) | generated %zu tokens, "
               "decode %.1f tok/s | finish %s | seed %llu\n",
               m1::group_name(backends).c_str(), prompt.size(), r.prefill_seconds, double(prompt.size()) / r.prefill_seconds,
               r.tokens.size(), decoded > 0 ? double(decoded) / r.decode_seconds : 0.0, r.finish_reason.c_str(),
               (unsigned long long)o.gen.sampling.seed);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"m1-generate: one-shot text generation with a MiniMax-M1 checkpoint"};
  Options o;
  m1::SamplingParams& s = o.gen.sampling;
  s.temperature = 0.8f;
  s.top_p = 0.95f;
  app.add_option("--model", o.model, "Checkpoint directory (config.json, safetensors, tokenizer.json)")->required();
  app.add_option("--prompt", o.prompt, "Raw prompt text");
  app.add_option("--chat", o.chat, "A user message, wrapped in the model's chat format");
  app.add_option("--system", o.system, "System message for --chat");
  app.add_option("--prompt-ids", o.prompt_ids, "Prompt as token ids: 1,2,3");
  app.add_option("--max-tokens", o.gen.max_tokens, "Most tokens to generate")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--temperature", s.temperature, "0 for greedy")->capture_default_str();
  app.add_option("--top-p", s.top_p, "Nucleus sampling mass")->capture_default_str();
  app.add_option("--top-k", s.top_k, "Keep the k most likely tokens (0: off)")->capture_default_str();
  app.add_option("--min-p", s.min_p, "Drop tokens below min-p times the best one's probability")->capture_default_str();
  app.add_option("--repetition-penalty", s.repetition_penalty, "Penalty for tokens already seen (1: off)")->capture_default_str();
  app.add_option("--presence-penalty", s.presence_penalty, "OpenAI presence penalty")->capture_default_str();
  app.add_option("--frequency-penalty", s.frequency_penalty, "OpenAI frequency penalty")->capture_default_str();
  app.add_option("--seed", o.seed, "Random seed (default: random, printed at the end)");
  app.add_option("--stop", o.gen.stop, "Stop string (repeatable); not printed");
  app.add_option("--threads", o.threads, "CPU threads (0: one per core)")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--prefill-chunk", o.gen.prefill_chunk, "Prompt tokens per forward step")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--device", o.device, "cpu or cuda (a build with the CUDA backend and a GPU)")->capture_default_str();
  app.add_option("--precision", o.precision, "fast (bf16 matrix operands where the CPU multiplies bf16, fp32 accumulation) or exact (fp32 throughout)")->capture_default_str();
  app.add_option("--logits-out", o.logits_out, "Write float32 logits of every prompt position to FILE");
  app.add_flag("--ignore-eos", o.ignore_eos, "Keep generating past the end-of-turn token");
  m1::add_parallel_flags(app, o.backend, o.parallel);
  app.add_option("--prompt-cache", o.prompt_cache, "Save the state after the prompt to FILE, and resume from it when the prompt starts with the saved one");
  app.add_flag("--prompt-cache-ro", o.prompt_cache_ro, "Resume from --prompt-cache but do not update it");
  app.add_option("--quantize", o.quantize, "Quantize weights while loading: int8 (a scale per row) or int4 (a scale per group)");
  app.add_option("--group-size", o.group_size, "--quantize int4: inputs per scale, a multiple of 32 (default 32)");
  app.add_flag("--quantize-lm-head", o.quantize_lm_head, "--quantize the LM head too (kept in its stored type by default)");
  CLI11_PARSE(app, argc, argv);
  // Log lines (memory per rank at load, warnings) on stderr: stdout carries the generated text.
  spdlog::set_default_logger(spdlog::stderr_logger_mt("m1-generate"));
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "m1-generate: %s\n", e.what());
    return 1;
  }
}
