#pragma once
// Helpers the test binaries share: checking m1::Error messages, running the built tools, reading
// files back.

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "m1/error.h"

namespace m1::testing {

// Runs fn and checks it throws m1::Error whose single-line message contains every part.
inline void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const m1::Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.find('\n'), std::string::npos) << "message is not one line: " << message;
    for (const std::string& part : parts)
      EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' missing from: " << message;
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected m1::Error, got another exception: " << e.what();
    return;
  } catch (...) {
    ADD_FAILURE() << "expected m1::Error, got a non-standard exception";
    return;
  }
  ADD_FAILURE() << "expected m1::Error, nothing was thrown";
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

}  // namespace m1::testing
