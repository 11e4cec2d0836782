#pragma once
// The least lexer bound (OutputFormat::max_lexer_states) under which an output format compiles,
// for tests that then drive its matching past the bound.

#include <cstdint>

#include "m1/error.h"
#include "m1/structured_output.h"

namespace m1::testing {

// Compiling builds the lexer's start states, so bounds below some least one are refused with
// m1::RequestError, and every bound from it on passes. Found by doubling, then bisection.
inline int32_t least_lexer_bound(OutputFormat format) {
  const auto compiles = [&](int32_t bound) {
    format.max_lexer_states = bound;
    try {
      compile_output_grammar(format);
      return true;
    } catch (const RequestError&) {
      return false;
    }
  };
  int32_t high = 1;
  while (!compiles(high)) high *= 2;
  int32_t low = high / 2;  // refused (or 0)
  while (high - low > 1) {
    const int32_t middle = low + (high - low) / 2;
    (compiles(middle) ? high : low) = middle;
  }
  return high;
}

}  // namespace m1::testing
