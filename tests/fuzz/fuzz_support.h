#pragma once
// What the fuzz targets share: the rule for exceptions, property checks that make libFuzzer keep
// the input, scratch files for parsers that read from disk, and the real tokenizer.

#include <unistd.h>

#include <cstdio>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>

#include "m1/error.h"
#include "m1/safetensors.h"
#include "m1/tokenizer.h"

namespace m1::fuzz {

// Says what went wrong and traps: libFuzzer saves the input as a crash reproducer.
[[noreturn]] inline void bug(const std::string& what) {
  std::fprintf(stderr, "m1 fuzz: %s\n", what.c_str());
  std::fflush(stderr);
  __builtin_trap();
}

inline void check(bool ok, const char* property) {
  if (!ok) bug(std::string("property violated: ") + property);
}

// Runs fn. m1::Error is how the engine turns bad input away, so its message is returned; any
// other exception is a bug.
template <class Fn>
std::optional<std::string> m1_error_of(Fn&& fn) {
  try {
    fn();
  } catch (const m1::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    bug(std::string("exception other than m1::Error: ") + e.what());
  } catch (...) {
    bug("exception of a non-standard type");
  }
  return std::nullopt;
}

// Runs fn, which must not throw at all: the input was accepted, so nothing after may reject it.
template <class Fn>
void must_not_throw(Fn&& fn) {
  if (const auto error = m1_error_of(fn)) bug("unexpected m1::Error: " + *error);
}

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// A directory of this process's own under TMPDIR, for parsers that only read files.
class ScratchDir {
 public:
  ScratchDir()
      : path_(std::filesystem::temp_directory_path() / ("m1-fuzz-" + std::to_string(::getpid()))) {
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  const std::filesystem::path& path() const { return path_; }

  // Replaces the file `name` with `bytes`; returns its path.
  std::filesystem::path write(const std::string& name, std::string_view bytes) const {
    const std::filesystem::path file = path_ / name;
    std::ofstream(file, std::ios::binary | std::ios::trunc).write(bytes.data(), std::streamsize(bytes.size()));
    return file;
  }

 private:
  std::filesystem::path path_;
};

// Reads the ends of every tensor a checkpoint accepted (a view past its mapping faults here) and
// checks the promise the kernels rely on: weights are aligned to their element size. Returns the
// tensors' total size.
inline size_t touch_tensors(const m1::Checkpoint& checkpoint) {
  size_t total = 0;
  for (const auto& [name, tensor] : checkpoint.tensors()) {
    check(tensor.numel() >= 0, "an accepted tensor has a countable number of elements");
    if (const auto dtype = m1::dtype_from_name(tensor.dtype_name)) {
      check(reinterpret_cast<uintptr_t>(tensor.data) % (size_t(m1::dtype_bits(*dtype)) / 8) == 0,
            "weights are aligned to their element size");
    }
    if (tensor.nbytes == 0) continue;
    const volatile std::byte* bytes = tensor.data;
    static_cast<void>(bytes[0]);
    static_cast<void>(bytes[tensor.nbytes - 1]);
    total += tensor.nbytes;
  }
  return total;
}

// The real MiniMax-M1 tokenizer, loaded once. Call it from LLVMFuzzerInitialize, so that the
// seconds it takes are not charged to the first input.
inline const m1::Tokenizer& real_tokenizer() {
  static const m1::Tokenizer tokenizer =
      m1::Tokenizer::load(std::string(M1_SOURCE_DIR) + "/data/minimax-m1/tokenizer.json");
  return tokenizer;
}

}  // namespace m1::fuzz
