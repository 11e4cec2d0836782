// Fuzzes config.json validation (parse_config): arbitrary JSON as it is, and laid over the real
// MiniMax-M1 config.json, so that one odd field is not stopped by the checks of the fields before
// it. A config it accepts must survive m1-mkmodel's round trip: written by config_to_json, it
// reads back the same.

#include <fstream>

#include <nlohmann/json.hpp>

#include "fuzz_support.h"
#include "m1/config.h"

namespace {

using nlohmann::json;

json real_config;

void check_config(const json& config) {
  m1::fuzz::m1_error_of([&] {
    const auto written = m1::config_to_json(m1::parse_config(config, "config.json"));
    m1::fuzz::must_not_throw([&] {
      const auto reread = m1::config_to_json(m1::parse_config(json::parse(written.dump()), "written"));
      m1::fuzz::check(reread == written, "a written config reads back the same");
    });
  });
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  real_config = json::parse(std::ifstream(std::string(M1_SOURCE_DIR) + "/data/minimax-m1/config.json"));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const json input = json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (input.is_discarded()) return 0;
  check_config(input);
  if (input.is_object()) {
    json overlaid = real_config;
    overlaid.update(input);
    check_config(overlaid);
  }
  return 0;
}
