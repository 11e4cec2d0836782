#pragma once
// The model being served: its backend, weights and tokenizer, and the engine whose scheduler
// thread alone runs the model. Built once at startup; HTTP handlers only submit to the engine.

#include <filesystem>
#include <memory>
#include <string>

#include "m1/backends.h"
#include "m1/engine.h"
#include "m1/model.h"
#include "m1/tokenizer.h"
#include "openai_request.h"

namespace m1::server {

struct ModelOptions {
  std::filesystem::path dir;
  std::string served_name;  // empty: the directory's name
  BackendOptions backend;
  LoadOptions load;  // quantization at load, and the MoE split of a tensor-parallel group
  EngineOptions engine;
  int32_t max_grammar_states = kDefaultMaxLexerStates;  // OutputFormat::max_lexer_states of every request
};

class ModelService {
 public:
  // Loads the checkpoint and starts the engine (slow). Throws m1::Error naming what is wrong.
  explicit ModelService(const ModelOptions& options);

  Engine& engine() { return *engine_; }
  const ServedModel& served() const { return served_; }
  std::string backend_name() const { return group_name(backends_); }

 private:
  // Destroyed in reverse: the engine stops before the model and tokenizer it uses go away.
  std::vector<std::unique_ptr<Backend>> backends_;  // one per rank
  std::unique_ptr<Model> model_;
  Tokenizer tokenizer_;
  std::unique_ptr<Engine> engine_;
  ServedModel served_;
};

// The name a model directory is served under by default: its last path component.
std::string default_served_name(const std::filesystem::path& dir);

}  // namespace m1::server
