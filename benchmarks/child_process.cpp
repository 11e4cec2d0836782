#include "child_process.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "m1/error.h"

namespace m1::bench {
namespace {

void write_all(int fd, const std::string& text) {
  for (size_t done = 0; done < text.size();) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the parent is gone; nobody is left to tell
    done += size_t(n);
  }
}

std::string read_all(int fd) {
  std::string text;
  char buffer[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return text;
    text.append(buffer, size_t(n));
  }
}

// The child's whole life: the task's result or its error, as one JSON message, then _exit so
// none of the parent's exit handlers or buffered output run twice.
[[noreturn]] void child_main(int fd, const std::function<nlohmann::json()>& task) {
  nlohmann::json message;
  try {
    message["result"] = task();
  } catch (const std::exception& e) {
    message["error"] = e.what();
  }
  write_all(fd, message.dump());
  ::close(fd);
  ::_exit(0);
}

void check_exit_status(int status) {
  if (WIFSIGNALED(status))
    fail("the measurement process was killed by signal {} ({}){}", WTERMSIG(status), strsignal(WTERMSIG(status)),
         WTERMSIG(status) == SIGKILL ? ": out of memory?" : "");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    fail("the measurement process exited with status {}", WEXITSTATUS(status));
}

}  // namespace

nlohmann::json run_in_child(const std::function<nlohmann::json()>& task) {
  int fds[2];
  if (::pipe(fds) != 0) fail("cannot create a pipe: {}", std::strerror(errno));
  std::fflush(nullptr);  // or the child would inherit, and later flush, a copy of pending output
  const pid_t pid = ::fork();
  if (pid < 0) fail("cannot fork a measurement process: {}", std::strerror(errno));
  if (pid == 0) {
    ::close(fds[0]);
    child_main(fds[1], task);
  }
  ::close(fds[1]);
  const std::string text = read_all(fds[0]);
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  check_exit_status(status);
  const nlohmann::json message = nlohmann::json::parse(text, nullptr, false);
  if (message.is_discarded() || !message.is_object()) fail("the measurement process sent no result");
  if (message.contains("error")) throw Error(message["error"].get<std::string>());
  return message["result"];
}

uint64_t peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::stoull(line.substr(6)) * 1024;  // the line reads "VmHWM: N kB"
  return 0;
}

}  // namespace m1::bench
