#include "model_service.h"

#include "m1/generation.h"

namespace m1::server {

ModelService::ModelService(const ModelOptions& options)
    : backends_(create_backends(options.backend)),
      model_(Model::load(options.dir, rank_pointers(backends_), options.load)),
      tokenizer_(Tokenizer::load(options.dir / "tokenizer.json")),
      engine_(std::make_unique<Engine>(*model_, tokenizer_, options.engine)),
      served_{.tokenizer = &tokenizer_,
              .name = options.served_name.empty() ? default_served_name(options.dir) : options.served_name,
              .end_of_turn = end_of_turn_token(options.dir, tokenizer_),
              .max_context = engine_->max_context(),
              .max_choices = options.engine.max_batch,
              .max_grammar_states = options.max_grammar_states} {}

std::string default_served_name(const std::filesystem::path& dir) {
  std::filesystem::path normal = std::filesystem::absolute(dir).lexically_normal();
  if (normal.filename().empty()) normal = normal.parent_path();  // "models/demo/" and "." have a name too
  return normal.filename().string();
}

}  // namespace m1::server
