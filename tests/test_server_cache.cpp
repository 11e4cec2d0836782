// m1-serve's prefix cache end to end: later turns and users resume from cached prefixes and
// answer exactly as a server without the cache; usage reports cached_tokens; cache_salt keeps
// requests apart; /metrics counts hits; snapshot files outlive a restart, and bad ones are deleted.

#include <gtest/gtest.h>

#include "server_harness.h"

namespace {

using namespace m1::testing;

class ServerCacheTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = make_model("cache");
    plain_dir_ = make_model("cache-plain");  // the same model (same seed), its own log
    plain_ = new ServerProcess(plain_dir_, {"--cache-mb", "0"});
  }
  static void TearDownTestSuite() {
    delete plain_;
    fs::remove_all(dir_);
    fs::remove_all(plain_dir_);
  }
  void TearDown() override { fs::remove_all(cache_dir()); }

  static fs::path cache_dir() { return dir_ / "snapshots"; }

  // A conversation: a long system prompt, then `turns` user turns with the answers between them.
  static ordered_json conversation(const std::vector<std::string>& users, const std::vector<std::string>& answers) {
    std::string system;
    for (int i = 0; i < 12; ++i) system += "Rule " + std::to_string(i) + ": answer in full sentences about lightning. ";
    ordered_json messages = {{{"role", "system"}, {"content", system}}};
    for (size_t i = 0; i < users.size(); ++i) {
      messages.push_back({{"role", "user"}, {"content", users[i]}});
      if (i < answers.size()) messages.push_back({{"role", "assistant"}, {"content", answers[i]}});
    }
    return {{"model", "tiny"}, {"messages", messages}, {"temperature", 0}, {"max_tokens", 12}};
  }

  static int64_t cached_tokens(const Reply& reply) {
    return reply.json["usage"]["prompt_tokens_details"]["cached_tokens"].get<int64_t>();
  }

  // The same request to the server without a cache.
  static std::string plain_text(const ordered_json& request) {
    const Reply reply = Client(plain_->port()).post("/v1/chat/completions", request);
    EXPECT_EQ(reply.status, 200) << reply.body;
    EXPECT_EQ(cached_tokens(reply), 0);
    return text_of(reply.json);
  }

  static fs::path dir_, plain_dir_;
  static ServerProcess* plain_;
};

fs::path ServerCacheTest::dir_;
fs::path ServerCacheTest::plain_dir_;
ServerProcess* ServerCacheTest::plain_ = nullptr;

// A chat of three turns and a second user with the same system prompt: each resumes from what came
// before, reports it, and answers as the server without a cache does.
TEST_F(ServerCacheTest, LaterTurnsResumeAndAnswerAsWithoutTheCache) {
  ServerProcess server(dir_, {"--cache-every", "128"});
  const Client client(server.port());
  std::vector<std::string> users = {"What is a lightning layer?"}, answers;
  int64_t last_cached = -1, total_cached = 0;
  for (int turn = 0; turn < 3; ++turn) {
    SCOPED_TRACE(turn);
    const ordered_json request = conversation(users, answers);
    const Reply reply = client.post("/v1/chat/completions", request);
    ASSERT_EQ(reply.status, 200) << reply.body;
    EXPECT_EQ(text_of(reply.json), plain_text(request));
    const int64_t cached = cached_tokens(reply);
    EXPECT_EQ(cached % 64, 0);
    EXPECT_TRUE(turn == 0 ? cached == 0 : cached > last_cached) << cached;
    EXPECT_LT(cached, reply.json["usage"]["prompt_tokens"].get<int64_t>());
    last_cached = cached;
    total_cached += cached;
    answers.push_back(text_of(reply.json));
    users.push_back("And then turn " + std::to_string(turn + 2) + "?");
  }
  // Another user, the same system prompt, streamed: usage comes in the last chunk.
  const ordered_json other = conversation({"Tell me something else entirely."}, {});
  const Stream stream = client.stream("/v1/chat/completions", streamed(other));
  ASSERT_TRUE(stream.done());
  EXPECT_EQ(text_of(stream), plain_text(other));
  const int64_t shared = stream.chunks().back()["usage"]["prompt_tokens_details"]["cached_tokens"].get<int64_t>();
  EXPECT_GE(shared, 128);  // the system prompt, to a multiple of 64

  const std::string metrics = idle_metrics(client);
  EXPECT_EQ(metric(metrics, "m1_prefix_cache_hits_total"), 3);
  EXPECT_EQ(metric(metrics, "m1_prefix_cache_misses_total"), 1);
  EXPECT_EQ(metric(metrics, "m1_prefix_cache_hit_tokens_total"), total_cached + shared);
  EXPECT_GT(metric(metrics, "m1_prefix_cache_bytes"), 0);
  EXPECT_GT(metric(metrics, "m1_prefix_cache_snapshots"), 3);
  EXPECT_EQ(metric(metrics, "m1_prefix_cache_evictions_total"), 0);
}

// Different salts never share; the same salt does; no salt is a scope of its own.
TEST_F(ServerCacheTest, CacheSaltsKeepRequestsApart) {
  ServerProcess server(dir_, {});
  const Client client(server.port());
  ordered_json request = conversation({"Salted question."}, {});
  auto cached_with = [&](const ordered_json& salt) {
    ordered_json r = request;
    if (!salt.is_null()) r["cache_salt"] = salt;
    const Reply reply = client.post("/v1/chat/completions", r);
    EXPECT_EQ(reply.status, 200) << reply.body;
    return cached_tokens(reply);
  };
  EXPECT_EQ(cached_with("alice"), 0);
  EXPECT_EQ(cached_with("bob"), 0);
  EXPECT_EQ(cached_with(nullptr), 0);
  EXPECT_GT(cached_with("alice"), 0);
  EXPECT_GT(cached_with(nullptr), 0);
  for (const ordered_json& bad : {ordered_json(""), ordered_json(7), ordered_json(std::string(1025, 'x'))}) {
    ordered_json r = request;
    r["cache_salt"] = bad;
    const Reply reply = client.post("/v1/chat/completions", r);
    EXPECT_EQ(reply.status, 400) << reply.body;
    EXPECT_EQ(reply.json["error"]["param"], "cache_salt") << reply.body;
  }
}

// With --cache-dir, a restarted server resumes from the files of the one before; damaged files
// and leftovers are deleted with a warning, and files of others' names are left alone.
TEST_F(ServerCacheTest, SnapshotFilesOutliveARestart) {
  const std::vector<std::string> flags = {"--cache-dir", cache_dir().string(), "--cache-min-tokens", "64"};
  const ordered_json first = conversation({"Remember this conversation."}, {});
  std::string answer;
  {
    ServerProcess server(dir_, flags);
    const Reply reply = Client(server.port()).post("/v1/chat/completions", first);
    ASSERT_EQ(reply.status, 200) << reply.body;
    answer = text_of(reply.json);
    server.signal(SIGTERM);
    EXPECT_EQ(server.wait(), 0) << server.log();
  }
  std::ofstream(cache_dir() / "00000000000000aa.m1snap") << "garbage";
  std::ofstream(cache_dir() / "keep.txt") << "not ours";
  ServerProcess server(dir_, flags);
  EXPECT_NE(server.log().find("00000000000000aa.m1snap: skipped and deleted: not a snapshot file"), std::string::npos)
      << server.log();
  EXPECT_FALSE(fs::exists(cache_dir() / "00000000000000aa.m1snap"));
  EXPECT_TRUE(fs::exists(cache_dir() / "keep.txt"));
  const ordered_json next = conversation({"Remember this conversation.", "What did I say?"}, {answer});
  const Client client(server.port());
  const Reply reply = client.post("/v1/chat/completions", next);
  ASSERT_EQ(reply.status, 200) << reply.body;
  EXPECT_GT(cached_tokens(reply), 64);
  EXPECT_EQ(text_of(reply.json), plain_text(next));
  const std::string metrics = idle_metrics(client);
  EXPECT_EQ(metric(metrics, "m1_prefix_cache_disk_hits_total"), 1);
  EXPECT_EQ(metric(metrics, "m1_prefix_cache_disk_rejected_total"), 1);
  EXPECT_GT(metric(metrics, "m1_prefix_cache_disk_files"), 0);
}

}  // namespace
