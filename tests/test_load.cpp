// m1-serve under load: 64 clients for M1_LOAD_SECONDS seconds (15 by default) mixing whole and
// streamed responses, chat and completions, short and long prompts, several choices, and
// clients that leave part way through. Every answer must equal what the same request got alone,
// nothing may fail, the engine's counters must balance once idle, and resident memory must come
// back to where it was. A second run with tight limits checks that overload is answered with 503
// and Retry-After, never by failing what runs. Figures are printed and recorded as properties.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <random>
#include <regex>
#include <thread>
#include <utility>

#include "server_harness.h"

namespace {

// AddressSanitizer holds freed blocks in a quarantine (256 MB) by design: resident memory then
// says nothing about leaks, which LeakSanitizer checks instead.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

using namespace m1::testing;
using Clock = std::chrono::steady_clock;

constexpr int kClients = 64;

std::chrono::seconds load_duration() {
  const char* seconds = std::getenv("M1_LOAD_SECONDS");
  return std::chrono::seconds(seconds != nullptr ? std::atoi(seconds) : 15);
}

// One kind of request the clients send, and the whole response it got when sent alone.
struct Workload {
  std::string path;
  ordered_json body;
  ordered_json alone;
};

// Chat and completions, short prompts and prompts of several hundred tokens, one to three
// choices, greedy and seeded sampling.
std::vector<Workload> mixed_workloads(int count, int max_tokens) {
  const std::string sentence = "The lightning attention layer keeps a running state of every head. ";
  std::vector<Workload> workloads;
  for (int i = 0; i < count; ++i) {
    std::string prompt = "Request " + std::to_string(i) + ": ";
    for (int k = 0; k < (i % 3 == 0 ? 40 : 1); ++k) prompt += sentence;
    const bool chat = i % 2 == 0;
    const int tokens = 4 + (i * 7) % max_tokens;
    ordered_json body = chat ? chat_request(prompt, tokens) : completion_request(prompt, tokens);
    body["n"] = 1 + i % 3;
    if (i % 4 == 3) {
      body["temperature"] = 0.9;
      body["seed"] = i;
    }
    workloads.push_back({chat ? "/v1/chat/completions" : "/v1/completions", std::move(body), {}});
  }
  return workloads;
}

// Sends every workload alone, one after the other: the answers everything must match.
void answer_alone(const Client& client, std::vector<Workload>& workloads) {
  for (Workload& w : workloads) {
    const Reply reply = client.post(w.path, w.body);
    ASSERT_EQ(reply.status, 200) << reply.body;
    w.alone = reply.json;
  }
}

std::string content_of(const ordered_json& choice) {
  const ordered_json& text = choice.contains("message") ? choice["message"]["content"] : choice["text"];
  return text.is_string() ? text.get<std::string>() : "";
}

// Usage without its cached_tokens, which depend on what the prefix cache held when it came.
ordered_json token_counts(ordered_json usage) {
  if (usage.is_object()) usage.erase("prompt_tokens_details");
  return usage;
}

// What differs between an answer and the workload's answer alone; empty when nothing does.
std::string difference(const Workload& w, const Reply& reply) {
  if (reply.json["choices"] != w.alone["choices"]) return "choices differ: " + reply.json["choices"].dump();
  if (token_counts(reply.json["usage"]) != token_counts(w.alone["usage"])) return "usage differs: " + reply.json["usage"].dump();
  return "";
}

std::string difference(const Workload& w, const Stream& stream) {
  if (!stream.done()) return "the stream ended without [DONE]";
  const ordered_json& choices = w.alone["choices"];
  for (int i = 0; i < int(choices.size()); ++i) {
    if (text_of(stream, i) != content_of(choices[i])) return "choice " + std::to_string(i) + " text differs";
    if (finish_of(stream, i) != choices[i]["finish_reason"]) return "choice " + std::to_string(i) + " finish differs";
  }
  if (token_counts(stream.chunks().back()["usage"]) != token_counts(w.alone["usage"])) return "usage differs";
  return "";
}

enum class Behaviour { kWhole, kStream, kLeaveStream, kLeaveWhole };

// What the clients saw.
struct Tally {
  int64_t completed = 0, left = 0, busy = 0;  // busy: 503 with Retry-After
  std::vector<double> seconds;                // latency of each completed request
  std::vector<std::string> problems;          // unexpected statuses, wrong answers

  void merge(const Tally& other) {
    completed += other.completed;
    left += other.left;
    busy += other.busy;
    seconds.insert(seconds.end(), other.seconds.begin(), other.seconds.end());
    problems.insert(problems.end(), other.problems.begin(), other.problems.end());
  }
  double percentile(double p) const {
    std::vector<double> sorted = seconds;
    std::sort(sorted.begin(), sorted.end());
    return sorted.empty() ? 0 : sorted[size_t(p * double(sorted.size() - 1))];
  }
};

// One client: sends workloads in a random order, each in a random way, until `deadline`.
class LoadClient {
 public:
  LoadClient(const Client& client, const std::vector<Workload>& workloads, unsigned seed)
      : client_(client), workloads_(workloads), random_(seed) {}

  Tally run(Clock::time_point deadline) {
    while (Clock::now() < deadline) send_one();
    return tally_;
  }

 private:
  void send_one() {
    const Workload& w = workloads_[std::uniform_int_distribution<size_t>(0, workloads_.size() - 1)(random_)];
    const int roll = std::uniform_int_distribution<int>(0, 99)(random_);
    const Behaviour behaviour = roll < 50   ? Behaviour::kWhole
                                : roll < 80 ? Behaviour::kStream
                                : roll < 90 ? Behaviour::kLeaveStream
                                            : Behaviour::kLeaveWhole;
    const auto start = Clock::now();
    const bool completed = behaviour == Behaviour::kWhole || behaviour == Behaviour::kLeaveWhole ? whole(w, behaviour)
                                                                                                 : stream(w, behaviour);
    if (completed) tally_.seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }

  // Each returns true when the request completed: answered, rightly or not (then a problem).
  // A client that leaves may still get the whole answer first, which is then checked too.
  bool whole(const Workload& w, Behaviour behaviour) {
    const auto patience = std::chrono::milliseconds(std::uniform_int_distribution<int>(5, 300)(random_));
    const Reply reply = behaviour == Behaviour::kLeaveWhole ? client_.with_read_timeout(patience).post(w.path, w.body)
                                                            : client_.post(w.path, w.body);
    if (reply.status == 0 && behaviour == Behaviour::kLeaveWhole) {
      ++tally_.left;
      return false;
    }
    return record(w, "whole", reply, reply.status == 200 ? difference(w, reply) : "");
  }
  bool stream(const Workload& w, Behaviour behaviour) {
    const int events = behaviour == Behaviour::kLeaveStream ? std::uniform_int_distribution<int>(1, 6)(random_) : -1;
    int seen = 0;
    const Stream s = client_.stream(w.path, streamed(w.body), [&](const ordered_json&) { return ++seen != events; });
    if (s.reply.status == 200 && !s.done() && behaviour == Behaviour::kLeaveStream) {
      ++tally_.left;
      return false;
    }
    return record(w, "streamed", s.reply, s.reply.status == 200 ? difference(w, s) : "");
  }
  // A refusal for being busy is the one answer that does not complete the request.
  bool record(const Workload& w, const char* how, const Reply& reply, const std::string& difference) {
    if (reply.status == 503 && reply.retry_after == "1" && reply.json["error"]["type"] == "server_busy") {
      ++tally_.busy;
      return false;
    }
    const std::string request = std::string(how) + " " + w.path + " " + w.body.dump() + ": ";
    if (reply.status != 200)
      tally_.problems.push_back(request + "status " + std::to_string(reply.status) + " " + reply.body + reply.error);
    if (!difference.empty()) tally_.problems.push_back(request + difference);
    ++tally_.completed;
    return true;
  }

  const Client& client_;
  const std::vector<Workload>& workloads_;
  std::mt19937 random_;
  Tally tally_;
};

Tally run_clients(const Client& client, const std::vector<Workload>& workloads, std::chrono::seconds duration) {
  const auto deadline = Clock::now() + duration;
  std::vector<std::future<Tally>> clients;
  for (int i = 0; i < kClients; ++i)
    clients.push_back(std::async(std::launch::async, [&, i] { return LoadClient(client, workloads, unsigned(i)).run(deadline); }));
  Tally all;
  for (auto& c : clients) all.merge(c.get());
  return all;
}

// Nothing failed: no engine request, no response with a 5xx status other than 503 (busy).
void expect_no_failures(const std::string& metrics) {
  expect_balanced(metrics);
  EXPECT_EQ(engine_requests(metrics, "failed"), 0) << metrics;
  const std::regex server_error("m1_requests_total\\{status=\"5\\d\\d\"\\} \\d+");
  for (std::sregex_iterator it(metrics.begin(), metrics.end(), server_error), end; it != end; ++it)
    if (it->str().find("status=\"503\"") == std::string::npos) ADD_FAILURE() << it->str();
}

void expect_no_problems(const Tally& tally) {
  EXPECT_GT(tally.completed, 0);
  for (size_t i = 0; i < std::min<size_t>(tally.problems.size(), 10); ++i) ADD_FAILURE() << tally.problems[i];
  EXPECT_TRUE(tally.problems.empty()) << tally.problems.size() << " problems";
}

void report(const char* name, const Tally& tally, std::chrono::seconds duration) {
  const double per_second = double(tally.completed) / double(duration.count());
  std::printf("%s: %d clients, %lld s: %lld completed (%.1f requests/s), %lld left early, %lld refused busy; "
              "latency p50 %.3f s, p99 %.3f s\n",
              name, kClients, (long long)duration.count(), (long long)tally.completed, per_second,
              (long long)tally.left, (long long)tally.busy, tally.percentile(0.5), tally.percentile(0.99));
  ::testing::Test::RecordProperty("requests_per_second", std::to_string(per_second));
  ::testing::Test::RecordProperty("latency_p50_s", std::to_string(tally.percentile(0.5)));
  ::testing::Test::RecordProperty("latency_p99_s", std::to_string(tally.percentile(0.99)));
}

// Resident memory once it has settled: the engine gives freed memory back as it goes idle,
// just after its counters say so.
int64_t settled_resident_kib(const ServerProcess& server) {
  int64_t last = -1, now = server.resident_kib();
  for (int i = 0; i < 25 && now != last; ++i) {
    std::this_thread::sleep_for(200ms);
    last = std::exchange(now, server.resident_kib());
  }
  return now;
}

class LoadTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = make_model(::testing::UnitTest::GetInstance()->current_test_info()->name()); }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path dir_;
};

TEST_F(LoadTest, SixtyFourClientsGetWhatTheyGetAlone) {
  ServerProcess server(dir_, {"--max-batch", "16", "--max-context", "2048"});
  const Client client(server.port());
  std::vector<Workload> workloads = mixed_workloads(24, 48);
  answer_alone(client, workloads);
  expect_no_problems(run_clients(client, workloads, 10s));  // warms up the allocator's pools and every thread
  idle_metrics(client, 120s);
  const int64_t resident_before = settled_resident_kib(server);

  const std::chrono::seconds duration = load_duration();
  const Tally tally = run_clients(client, workloads, duration);
  const std::string metrics = idle_metrics(client, 120s);
  const int64_t resident_after = settled_resident_kib(server);

  report("load", tally, duration);
  std::printf("load: resident memory %lld KiB before, %lld KiB after; engine requests %lld started, %lld cancelled\n",
              (long long)resident_before, (long long)resident_after,
              (long long)engine_requests(metrics, "started"), (long long)engine_requests(metrics, "cancelled"));
  RecordProperty("resident_kib_before", std::to_string(resident_before));
  RecordProperty("resident_kib_after", std::to_string(resident_after));
  expect_no_problems(tally);
  EXPECT_EQ(tally.busy, 0) << "the queue holds every client";
  expect_no_failures(metrics);
  if (!kSanitized) {
    EXPECT_LE(double(resident_after), 1.10 * double(resident_before));
  }
  EXPECT_TRUE(server.running());
}

// 64 clients against a batch of two, a queue of two and a state budget of one whole-context
// sequence (two long prompts, over half the context each, cannot run together): most are told
// to come back, and every answer that is given is right.
TEST_F(LoadTest, OverloadIsAnswered503WithRetryAfter) {
  const int64_t context = 2048;
  const double sequence_mb = double(cpu_state_bytes(dir_ / "tiny", context)) / (1 << 20);
  ServerProcess server(dir_, {"--max-batch", "2", "--max-queue", "2", "--max-context", std::to_string(context),
                              "--max-state-mb", std::to_string(1.02 * sequence_mb)});
  const Client client(server.port());
  std::vector<Workload> workloads = mixed_workloads(6, 24);
  for (Workload& w : workloads) w.body["n"] = 1;  // the batch holds two sequences
  answer_alone(client, workloads);

  const std::chrono::seconds duration = std::max(load_duration() / 3, std::chrono::seconds(5));
  const Tally tally = run_clients(client, workloads, duration);
  report("overload", tally, duration);
  expect_no_problems(tally);
  EXPECT_GT(tally.busy, 0) << "the limits were never reached";
  expect_no_failures(idle_metrics(client, 120s));
  EXPECT_TRUE(server.running());
}

}  // namespace
