// The test harness's own process handling: a server that cannot be started, or that dies before it
// listens, fails the test cleanly and signals nothing else (tests/server_harness.h). Run as root, a
// kill() of pid -1 would end every process on the machine; a process started beside the failed
// server stands for them here.

#include <gtest/gtest-spi.h>
#include <spawn.h>
#include <sys/wait.h>

#include <memory>

#include "server_harness.h"

extern char** environ;

namespace m1::testing {
namespace {

// A bystander: a child that sleeps until it is killed.
class Bystander {
 public:
  Bystander() {
    std::vector<std::string> args = {"/bin/sleep", "300"};
    std::vector<char*> argv = {args[0].data(), args[1].data(), nullptr};
    EXPECT_EQ(posix_spawn(&pid_, argv[0], nullptr, nullptr, argv.data(), environ), 0);
  }
  ~Bystander() {
    if (pid_ > 0 && ::kill(pid_, SIGKILL) == 0) ::waitpid(pid_, nullptr, 0);
  }
  bool alive() const { return pid_ > 0 && ::waitpid(pid_, nullptr, WNOHANG) == 0; }

 private:
  pid_t pid_ = -1;
};

class HarnessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("m1-harness-" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Starts a server from `binary`, which must fail with a message containing `expected`; then
  // does to it everything the server tests do at their end.
  void start_failing(const std::string& binary, const std::string& expected) {
    Bystander bystander;
    ASSERT_TRUE(bystander.alive());
    std::unique_ptr<ServerProcess> server;
    EXPECT_NONFATAL_FAILURE(server = std::make_unique<ServerProcess>(dir_, std::vector<std::string>{}, binary), expected);
    ASSERT_TRUE(server);
    EXPECT_EQ(server->port(), 0);
    EXPECT_FALSE(server->running());
    EXPECT_FALSE(server->signal(SIGTERM));  // nothing to signal, and nothing signalled
    EXPECT_EQ(server->wait(), server->wait());
    server.reset();  // the destructor signals nothing either
    EXPECT_TRUE(bystander.alive());
  }

  fs::path dir_;
};

TEST_F(HarnessTest, ASpawnThatFailsIsAFailureAndSignalsNobody) {
  start_failing((dir_ / "no-such-m1-serve").string(), "cannot start " + (dir_ / "no-such-m1-serve").string());
}

TEST_F(HarnessTest, AServerThatExitsBeforeListeningIsAFailureAndSignalsNobody) {
  // /bin/false starts, then exits 1 at once: the harness reaps it, and later calls find no child.
  start_failing("/bin/false", "exited with status 1 before it listened");
}

}  // namespace
}  // namespace m1::testing
