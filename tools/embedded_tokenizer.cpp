// The bytes of data/minimax-m1/tokenizer.json and tokenizer_config.json, included by the assembler
// (.incbin) so that 7 MB of data costs no compile time. The build passes the files' paths.

#include "embedded_tokenizer.h"

#define M1_EMBED(symbol, path)                  \
  asm(".section .rodata\n"                      \
      ".balign 16\n"                            \
      ".globl " #symbol "_begin\n"              \
      ".globl " #symbol "_end\n" #symbol        \
      "_begin:\n"                               \
      ".incbin \"" path "\"\n" #symbol "_end:\n" \
      ".byte 0\n"                               \
      ".previous\n")

M1_EMBED(m1_embedded_tokenizer_json, M1_TOKENIZER_JSON);
M1_EMBED(m1_embedded_tokenizer_config_json, M1_TOKENIZER_CONFIG_JSON);

extern "C" const char m1_embedded_tokenizer_json_begin[], m1_embedded_tokenizer_json_end[];
extern "C" const char m1_embedded_tokenizer_config_json_begin[], m1_embedded_tokenizer_config_json_end[];

namespace m1::tools {

std::string_view embedded_tokenizer_json() {
  return {m1_embedded_tokenizer_json_begin, size_t(m1_embedded_tokenizer_json_end - m1_embedded_tokenizer_json_begin)};
}

std::string_view embedded_tokenizer_config_json() {
  return {m1_embedded_tokenizer_config_json_begin,
          size_t(m1_embedded_tokenizer_config_json_end - m1_embedded_tokenizer_config_json_begin)};
}

}  // namespace m1::tools
