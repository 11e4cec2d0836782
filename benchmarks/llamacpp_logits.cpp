// The peer's logits for accuracy comparisons: runs a GGUF model with llama.cpp (built by the peer
// kit, not by this repository) over token ids and writes float32 logits of every position,
// [tokens, vocab] row-major, as m1-generate --logits-out does. compare_accuracy.sh builds it
// against the llama.cpp it is given.
//   llamacpp_logits MODEL.gguf IDS OUT.f32 [THREADS]     (IDS: comma-separated token ids)

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "llama.h"

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: llamacpp_logits MODEL.gguf IDS OUT.f32 [THREADS]\n");
    return 2;
  }
  std::vector<llama_token> tokens;
  std::stringstream ids(argv[2]);
  for (std::string item; std::getline(ids, item, ',');) tokens.push_back(llama_token(std::atoi(item.c_str())));
  const int threads = argc > 4 ? std::atoi(argv[4]) : 2;

  llama_backend_init();
  llama_model_params mp = llama_model_default_params();
  llama_model* model = llama_model_load_from_file(argv[1], mp);
  if (!model) {
    std::fprintf(stderr, "llamacpp_logits: cannot load %s\n", argv[1]);
    return 1;
  }
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = uint32_t(tokens.size() + 16);
  cp.n_batch = cp.n_ubatch = uint32_t(tokens.size());
  cp.n_threads = cp.n_threads_batch = threads;
  llama_context* ctx = llama_init_from_model(model, cp);
  if (!ctx) {
    std::fprintf(stderr, "llamacpp_logits: cannot make a context\n");
    return 1;
  }
  llama_batch batch = llama_batch_init(int32_t(tokens.size()), 0, 1);
  batch.n_tokens = int32_t(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    batch.token[i] = tokens[i];
    batch.pos[i] = llama_pos(i);
    batch.n_seq_id[i] = 1;
    batch.seq_id[i][0] = 0;
    batch.logits[i] = 1;
  }
  if (llama_decode(ctx, batch) != 0) {
    std::fprintf(stderr, "llamacpp_logits: llama_decode failed\n");
    return 1;
  }
  const int32_t vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  FILE* out = std::fopen(argv[3], "wb");
  if (!out) {
    std::fprintf(stderr, "llamacpp_logits: cannot write %s\n", argv[3]);
    return 1;
  }
  for (size_t i = 0; i < tokens.size(); ++i) std::fwrite(llama_get_logits_ith(ctx, int32_t(i)), sizeof(float), size_t(vocab), out);
  std::fclose(out);
  llama_batch_free(batch);
  llama_free(ctx);
  llama_model_free(model);
  llama_backend_free();
  return 0;
}
