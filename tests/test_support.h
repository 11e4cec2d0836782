#pragma once
// Helpers the test binaries share: checking m1::Error messages, running the built tools, reading
// files back, random inputs and comparing results.

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "m1/backend.h"
#include "m1/backends.h"
#include "m1/dtype.h"
#include "m1/error.h"
#include "m1/quantize.h"

namespace m1::testing {

// Runs fn and checks it throws m1::Error (or the subclass Expected) whose single-line message
// contains every part.
template <class Expected = m1::Error>
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const Expected& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.find('\n'), std::string::npos) << "message is not one line: " << message;
    for (const std::string& part : parts)
      EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' missing from: " << message;
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected m1::Error (or the subclass asked for), got another exception: " << e.what();
    return;
  } catch (...) {
    ADD_FAILURE() << "expected m1::Error (or the subclass asked for), got a non-standard exception";
    return;
  }
  ADD_FAILURE() << "expected m1::Error (or the subclass asked for), nothing was thrown";
}

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

struct CommandResult {
  int status = -1;  // exit code; -1 when killed by a signal
  std::string out, err;
};

// Runs a shell command line with `stdin_text` on its standard input, capturing both outputs.
inline CommandResult run_command(const std::string& command, const std::string& stdin_text = "") {
  namespace fs = std::filesystem;
  const std::string tag = std::to_string(::getpid());
  const fs::path err = fs::temp_directory_path() / ("m1-test-stderr-" + tag);
  const fs::path in = fs::temp_directory_path() / ("m1-test-stdin-" + tag);
  std::ofstream(in) << stdin_text;
  CommandResult r;
  FILE* p = ::popen((command + " <" + in.string() + " 2>" + err.string()).c_str(), "r");
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) r.out.append(buf, n);
  const int status = ::pclose(p);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.err = read_file(err);
  fs::remove(err);
  fs::remove(in);
  return r;
}

// The seed of rng(): M1_TEST_SEED when set, to replay a failure, else a fresh one.
inline uint64_t seed() {
  static const uint64_t value = [] {
    const char* env = std::getenv("M1_TEST_SEED");
    return env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  }();
  return value;
}

// The test binary's shared random engine, seeded once from seed().
inline std::mt19937_64& rng() {
  static std::mt19937_64 r(seed());
  return r;
}

// n draws from N(0, scale^2), from `engine` or else rng().
template <class Engine>
std::vector<float> random_floats(size_t n, float scale, Engine& engine) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(engine);
  return v;
}
inline std::vector<float> random_floats(size_t n, float scale = 1.0f) { return random_floats(n, scale, rng()); }

// `values` stored in `dtype`, rounded as the model's weights are.
inline std::vector<uint8_t> encode(DType dtype, const std::vector<float>& values) {
  std::vector<uint8_t> bytes(matrix_bytes(dtype, 1, int64_t(values.size())));
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::kF32) {
      std::memcpy(&bytes[4 * i], &values[i], 4);
    } else {
      const uint16_t h = dtype == DType::kBF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
      std::memcpy(&bytes[2 * i], &h, 2);
    }
  }
  return bytes;
}

// A weight matrix in `dtype` holding random N(0, scale^2) values rounded as stored: the bytes and
// the Weight view of them (moving keeps the view valid; copying would not, so it is deleted).
struct RandomWeight {
  std::vector<uint8_t> bytes;
  Weight w;
  template <class Engine>
  RandomWeight(DType dtype, int64_t rows, int64_t cols, float scale, Engine& engine)
      : bytes(encode(dtype, random_floats(size_t(rows * cols), scale, engine))), w{bytes.data(), dtype, rows, cols} {}
  RandomWeight(DType dtype, int64_t rows, int64_t cols, float scale = 1.0f)
      : RandomWeight(dtype, rows, cols, scale, rng()) {}
  RandomWeight(RandomWeight&&) = default;
  RandomWeight(const RandomWeight&) = delete;
  RandomWeight& operator=(const RandomWeight&) = delete;
};

// A quantized weight of random N(0, scale^2) values (quantized from bf16): moving keeps it valid.
struct RandomQuantizedWeight {
  QuantizedWeight quantized;
  Weight w;
  RandomQuantizedWeight(const QuantScheme& scheme, int64_t rows, int64_t cols, float scale = 1.0f)
      : quantized(quantize(RandomWeight(DType::kBF16, rows, cols, scale).w, scheme, "random")), w(quantized.weight()) {}
};

// ||got - want|| / ||want|| (||got - want|| when want is all zeros). Infinite on any non-finite
// value on either side, so NaN never passes, and on a size mismatch, so a short result never does.
inline double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) {
    ADD_FAILURE() << "relative_error: " << got.size() << " values against " << want.size();
    return INFINITY;
  }
  double diff = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(want[i])) return INFINITY;
    diff += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    norm += double(want[i]) * want[i];
  }
  return norm == 0 ? std::sqrt(diff) : std::sqrt(diff / norm);
}

}  // namespace m1::testing
