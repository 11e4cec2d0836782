#pragma once
// Token counts as people write them on a command line and read them in a table: 512, 4k, 1m
// (k = 1024, m = 1024^2).

#include <cstdint>
#include <optional>
#include <string>

namespace m1::bench {

// "4k" -> 4096; nullopt for anything that is not a non-negative count with an optional k or m.
std::optional<int64_t> parse_token_count(const std::string& text);
// 4096 -> "4k", 1048576 -> "1m", 1000 -> "1000".
std::string format_token_count(int64_t tokens);

}  // namespace m1::bench
