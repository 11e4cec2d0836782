// The prefix cache: a request resumed from a snapshot gets exactly what a cold prefill gives (the
// same tokens, log-probabilities and logits, bit for bit, in exact precision), however the prompt
// is cut; snapshots share their KV rows and are dropped least recently used first; scopes never
// share; snapshot files survive a restart, and damaged or foreign ones are deleted, never used.

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <thread>

#include "m1/engine.h"
#include "m1/prefill.h"
#include "m1/prefix_cache.h"
#include "m1/state_snapshot.h"
#include "snapshot_tree.h"
#include "test_support.h"

namespace m1 {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;
using testing::relative_error;

const std::string kModel = std::string(M1_SOURCE_DIR) + "/tests/data/golden/odd-f32";
constexpr int64_t kAlign = 64;  // the CPU backend's prefill alignment

// Token ids 1..599 from a seed, reproducibly.
std::vector<int32_t> tokens(uint64_t seed, int64_t count) {
  std::vector<int32_t> t;
  for (int64_t i = 0; i < count; ++i) t.push_back(int32_t(1 + (seed * 7919 + uint64_t(i) * 104729 + uint64_t(i * i)) % 599));
  return t;
}

std::vector<int32_t> operator+(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// What a request produced, compared exactly: tokens, their log-probabilities and alternatives.
struct Answer {
  std::vector<SampledToken> tokens;
  int64_t cached = 0;
  std::vector<int32_t> ids() const {
    std::vector<int32_t> ids;
    for (const SampledToken& t : tokens) ids.push_back(t.id);
    return ids;
  }
};

void expect_same(const Answer& warm, const Answer& cold, const std::string& what) {
  ASSERT_EQ(warm.tokens.size(), cold.tokens.size()) << what;
  for (size_t i = 0; i < cold.tokens.size(); ++i) {
    EXPECT_EQ(warm.tokens[i].id, cold.tokens[i].id) << what << ", token " << i;
    EXPECT_EQ(warm.tokens[i].logprob, cold.tokens[i].logprob) << what << ", token " << i;  // bit for bit
    EXPECT_EQ(warm.tokens[i].top, cold.tokens[i].top) << what << ", token " << i;
  }
}

class PrefixCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = create_backend(BackendOptions{"cpu", 2, Precision::kExact});
    model_ = Model::load(kModel, *backend_);
    tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::load(kModel + "/tokenizer.json"));
    dir_ = fs::temp_directory_path() /
           ("m1-prefix-cache-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  static EngineOptions options(int64_t cache_bytes, int64_t step_tokens = 128, int64_t every = 64) {
    EngineOptions o;
    o.max_batch = 4;
    o.step_tokens = step_tokens;
    o.cache.max_bytes = cache_bytes;
    o.cache.every = every;
    return o;
  }
  EngineOptions on_disk(int64_t cache_bytes = 64 << 20) const {
    EngineOptions o = options(cache_bytes);
    o.cache.dir = dir_;
    o.cache.dir_max_bytes = 64 << 20;
    o.cache.min_disk_tokens = 64;
    return o;
  }

  static GenerationRequest greedy(const std::vector<int32_t>& prompt, const std::string& scope = "", int64_t max_tokens = 12) {
    GenerationRequest r;
    r.prompt = prompt;
    r.max_tokens = max_tokens;
    r.sampling.temperature = 0;
    r.sampling.top_logprobs = 5;
    r.cache_scope = scope;
    return r;
  }

  static Answer ask(Engine& engine, const GenerationRequest& r) {
    Answer a;
    auto stream = engine.submit(r);
    for (;;) {
      auto e = stream->next(std::chrono::seconds(60));
      if (!e) {
        ADD_FAILURE() << "stream stalled";
        return a;
      }
      if (e->kind == GenerationEvent::Kind::kToken) a.tokens.push_back(e->token);
      if (e->kind == GenerationEvent::Kind::kFinish) {
        EXPECT_TRUE(e->error.empty()) << e->error;
      }
      if (e->kind == GenerationEvent::Kind::kDone) {
        a.cached = e->cached_tokens;
        return a;
      }
    }
  }

  // Each request alone with no cache, one after the other.
  std::vector<Answer> cold(const std::vector<GenerationRequest>& requests, int64_t step_tokens = 512) {
    Engine engine(*model_, *tokenizer_, options(0, step_tokens));
    std::vector<Answer> answers;
    for (const GenerationRequest& r : requests) answers.push_back(ask(engine, r));
    return answers;
  }

  // The logits of the last prompt position and the state after it, prefilled in chunks as
  // prefill_chunk_end cuts them with this budget (and a stop), from `start` if given.
  struct Prefilled {
    std::vector<float> logits;
    StateCopy state;
  };
  Prefilled prefill(const std::vector<int32_t>& prompt, int64_t budget, int64_t stop = 0,
                    std::unique_ptr<SequenceState> start = nullptr, int64_t alignment = kAlign) {
    auto seq = start ? std::move(start) : model_->new_sequence();
    StepLogits logits;
    const int64_t n = int64_t(prompt.size());
    for (int64_t pos = seq->length(); pos < n;) {
      const int64_t end = prefill_chunk_end(pos, n, budget, alignment, stop);
      BatchEntry e{seq.get(), std::span(prompt).subspan(size_t(pos), size_t(end - pos)),
                   end == n ? LogitsFor::kLast : LogitsFor::kNone};
      model_->forward({&e, 1}, logits);
      pos = end;
    }
    auto row = logits.row(0, 0);
    return {{row.begin(), row.end()}, copy_state(*seq)};
  }

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  fs::path dir_;
};

TEST(PrefillChunks, CutsFallOnTheAlignmentAndALastLoneTokenRunsAlone) {
  EXPECT_EQ(prefill_chunk_end(0, 1000, 512, 64), 512);
  EXPECT_EQ(prefill_chunk_end(0, 1000, 500, 64), 448);    // down to a multiple of 64
  EXPECT_EQ(prefill_chunk_end(448, 1000, 600, 64), 1000);  // the rest in one
  EXPECT_EQ(prefill_chunk_end(0, 1000, 512, 64, 320), 320);  // a snapshot point
  EXPECT_EQ(prefill_chunk_end(0, 1000, 40, 64), 40);      // the budget reaches no multiple: cut anyway
  EXPECT_EQ(prefill_chunk_end(40, 1000, 40, 64), 64);
  EXPECT_EQ(prefill_chunk_end(0, 129, 512, 64), 128);     // 129 = 2 * 64 + 1: the last token alone
  EXPECT_EQ(prefill_chunk_end(128, 129, 512, 64), 129);
  EXPECT_EQ(prefill_chunk_end(0, 1, 512, 64), 1);
  EXPECT_EQ(prefill_chunk_end(0, 129, 512, 1), 129);       // alignment 1: no promise, no rule
  EXPECT_EQ(last_snapshot_point(1000, 64), 960);
  EXPECT_EQ(last_snapshot_point(961, 64), 960);
  EXPECT_EQ(last_snapshot_point(960, 64), 896);  // one token at least stays to prefill
  EXPECT_EQ(last_snapshot_point(64, 64), 0);
}

// The claim the cache stands on: cuts at multiples of the alignment change no bit of the logits or
// the state, with every chunk budget and stop; other cuts change only the rounding.
TEST_F(PrefixCacheTest, AlignedCutsChangeNoBitOtherCutsOnlyTheRounding) {
  for (int64_t length : {65, 129, 300}) {
    SCOPED_TRACE(length);
    const std::vector<int32_t> prompt = tokens(uint64_t(length), length);
    const Prefilled whole = prefill(prompt, 4096);
    for (auto [budget, stop] : {std::pair<int64_t, int64_t>{64, 0}, {100, 0}, {4096, 64}, {200, 192}}) {
      const Prefilled cut = prefill(prompt, budget, stop);
      EXPECT_EQ(cut.logits, whole.logits) << "budget " << budget << ", stop " << stop;
      EXPECT_EQ(cut.state.lightning, whole.state.lightning);
      EXPECT_EQ(cut.state.kv, whole.state.kv);
    }
    // Cut anywhere (alignment 1 makes every cut allowed): the rounding changes (about 2e-7), no more.
    for (int64_t budget : {50, 100}) {
      const Prefilled cut = prefill(prompt, budget, 0, nullptr, 1);
      EXPECT_LE(relative_error(cut.logits, whole.logits), 1e-6) << "budget " << budget;
      EXPECT_NE(cut.logits, whole.logits) << "budget " << budget << ": then the alignment would not matter";
    }
  }
}

TEST_F(PrefixCacheTest, ARestoredStateGoesOnAsTheOriginal) {
  const std::vector<int32_t> prompt = tokens(3, 250);
  const Prefilled whole = prefill(prompt, 512);
  // Snapshot at 192 in two KV ranges, restored, then the rest of the prompt.
  auto seq = model_->new_sequence();
  StepLogits logits;
  BatchEntry e{seq.get(), std::span(prompt).first(192), LogitsFor::kNone};
  model_->forward({&e, 1}, logits);
  const StateCopy copy = copy_state(*seq);
  std::vector<std::byte> head(seq->kv_bytes(70)), tail(seq->kv_bytes(122));
  seq->save_kv(0, 70, head);
  seq->save_kv(70, 192, tail);
  SnapshotPieces pieces{{{head, 70}, {tail, 122}}, copy.lightning};
  auto restored = restore_state(*model_, pieces);
  EXPECT_EQ(restored->length(), 192);
  EXPECT_EQ(copy_state(*restored).kv, copy.kv);
  const Prefilled resumed = prefill(prompt, 512, 0, std::move(restored));
  EXPECT_EQ(resumed.logits, whole.logits);
  EXPECT_EQ(resumed.state.lightning, whole.state.lightning);
  EXPECT_EQ(resumed.state.kv, whole.state.kv);

  expect_error([&] { seq->save_kv(100, 300, head); }, {"KV rows [100, 300)", "192 tokens"});
  expect_error([&] { seq->save_kv(0, 10, head); }, {"bytes given"});
  expect_error([&] { model_->new_sequence()->load_lightning(head); }, {"lightning states"});
}

TEST_F(PrefixCacheTest, SnapshotFilesRoundTripAndRefuseWhatIsWrong) {
  fs::create_directories(dir_);
  const std::vector<int32_t> prompt = tokens(5, 200);
  auto seq = model_->new_sequence();
  StepLogits logits;
  BatchEntry e{seq.get(), std::span(prompt).first(128), LogitsFor::kNone};
  model_->forward({&e, 1}, logits);
  const StateCopy copy = copy_state(*seq);
  const SnapshotFormat format = snapshot_format(*model_);
  const fs::path file = dir_ / "a.m1snap";
  write_snapshot_file(file, format, "scope", std::span(prompt).first(128), copy.pieces());
  SnapshotFileInfo info = read_snapshot_info(file, format);
  EXPECT_EQ(info.scope, "scope");
  EXPECT_EQ(info.tokens, std::vector<int32_t>(prompt.begin(), prompt.begin() + 128));
  auto state = read_snapshot_state(file, format, *model_, info);
  EXPECT_EQ(copy_state(*state).kv, copy.kv);
  EXPECT_EQ(copy_state(*state).lightning, copy.lightning);
  EXPECT_EQ(fs::status(file).permissions() & fs::perms::others_read, fs::perms::none);

  const std::string bytes = testing::read_file(file);
  auto damaged = [&](const std::string& name, std::string contents) {
    std::ofstream(dir_ / name, std::ios::binary) << contents;
    return dir_ / name;
  };
  auto expect_refused = [&](const fs::path& path, const std::string& why, bool header_ok) {
    SCOPED_TRACE(path.filename().string());
    try {
      SnapshotFileInfo i;
      if (header_ok) read_snapshot_info(path, format);
      read_snapshot_state(path, format, *model_, i);
      ADD_FAILURE() << "accepted";
    } catch (const SnapshotFileError& error) {
      EXPECT_NE(std::string(error.what()).find(why), std::string::npos) << error.what();
    }
  };
  std::string flipped = bytes;
  flipped[flipped.size() - 100] ^= 1;  // in the KV rows
  expect_refused(damaged("flipped.m1snap", flipped), "checksum mismatch", true);
  expect_refused(damaged("short.m1snap", bytes.substr(0, bytes.size() - 1)), "truncated or damaged", false);
  expect_refused(damaged("empty.m1snap", ""), "not a snapshot file", false);
  expect_refused(damaged("text.m1snap", "hello, world, not a snapshot"), "not a snapshot file", false);
  SnapshotFormat other = format;
  other.model = "0123456789abcdef";
  write_snapshot_file(dir_ / "model.m1snap", other, "scope", std::span(prompt).first(128), copy.pieces());
  expect_refused(dir_ / "model.m1snap", "made for another model", false);
  other = format;
  other.numerics = "cuda (NVIDIA H200, exact precision)";
  write_snapshot_file(dir_ / "numerics.m1snap", other, "scope", std::span(prompt).first(128), copy.pieces());
  expect_refused(dir_ / "numerics.m1snap", "made by another backend or precision", false);
  expect_error([&] { write_snapshot_file(dir_ / "missing" / "x.m1snap", format, "", std::span(prompt).first(128), copy.pieces()); },
               {"missing/x.m1snap", "cannot write the snapshot"});
}

// Snapshots sharing a prefix share its KV rows; edges split where prompts part; the least
// recently used go first; a snapshot larger than the budget is not kept.
TEST_F(PrefixCacheTest, TheTreeSharesRowsAndDropsTheLeastRecentlyUsed) {
  const std::vector<int32_t> base = tokens(7, 256), a = base + tokens(8, 64), b = base + tokens(9, 64);
  auto state_after = [&](const std::vector<int32_t>& prompt, int64_t n) {
    auto seq = model_->new_sequence();
    StepLogits logits;
    BatchEntry e{seq.get(), std::span(prompt).first(size_t(n)), LogitsFor::kNone};
    model_->forward({&e, 1}, logits);
    return seq;
  };
  const auto probe = model_->new_sequence();
  const int64_t row = int64_t(probe->kv_bytes(1)), fixed = int64_t(probe->lightning_bytes());
  SnapshotTree tree(3 * fixed + 400 * row, 2 * model_->state_shape().softmax_layers, row);
  ASSERT_TRUE(tree.insert("", std::span(a).first(320), *state_after(a, 320)));
  ASSERT_TRUE(tree.insert("", std::span(b).first(320), *state_after(b, 320)));  // splits a's edge at 256
  EXPECT_EQ(tree.snapshots(), 2);
  EXPECT_EQ(tree.bytes(), 2 * fixed + (256 + 64 + 64) * row);  // the 256 shared rows once
  EXPECT_FALSE(tree.find("", base, 1000));                      // no snapshot at 256 itself
  auto found = tree.find("", a + tokens(10, 5), 1000);
  ASSERT_TRUE(found);
  EXPECT_EQ(found->tokens, 320);
  auto restored = restore_state(*model_, found->pieces);
  EXPECT_EQ(copy_state(*restored).kv, copy_state(*state_after(a, 320)).kv);
  EXPECT_FALSE(tree.find("", a, 319));  // the limit
  EXPECT_FALSE(tree.find("other", a, 1000));

  // A third snapshot, of base at 256 (the split point), then a fourth: b was used longest ago.
  ASSERT_TRUE(tree.insert("", base, *state_after(base, 256)));
  EXPECT_EQ(tree.bytes(), 3 * fixed + 384 * row);
  const std::vector<int32_t> c = tokens(11, 64);
  ASSERT_TRUE(tree.insert("", c, *state_after(c, 64)));
  EXPECT_EQ(tree.evictions(), 1);
  EXPECT_LE(tree.bytes(), 3 * fixed + 400 * row);
  EXPECT_EQ(tree.find("", b, 1000)->tokens, 256);  // b's own snapshot is gone: base's is found
  EXPECT_EQ(tree.find("", a, 1000)->tokens, 320);
  EXPECT_EQ(tree.bytes(), 3 * fixed + (256 + 64 + 64) * row);  // b's 64 rows freed

  const std::vector<int32_t> long_prompt = tokens(12, 600);
  EXPECT_FALSE(tree.insert("", long_prompt, *state_after(long_prompt, 600)));  // alone beyond the budget
  EXPECT_EQ(tree.snapshots(), 3);
}

// Users who share a system prompt: the later ones resume from the earlier one's snapshots.
TEST_F(PrefixCacheTest, ASharedSystemPromptIsPrefilledOnce) {
  const std::vector<int32_t> system = tokens(20, 200);
  std::vector<GenerationRequest> requests;
  for (uint64_t user = 0; user < 3; ++user) requests.push_back(greedy(system + tokens(21 + user, 30)));
  const std::vector<Answer> expected = cold(requests);
  Engine engine(*model_, *tokenizer_, options(64 << 20));
  for (size_t i = 0; i < requests.size(); ++i) {
    const Answer got = ask(engine, requests[i]);
    expect_same(got, expected[i], "user " + std::to_string(i));
    EXPECT_EQ(got.cached, i == 0 ? 0 : 192);  // the last multiple of 64 within the shared 200
  }
  const EngineStats s = engine.stats();
  EXPECT_EQ(s.cache.hits, 2);
  EXPECT_EQ(s.cache.misses, 1);
  EXPECT_EQ(s.cache.hit_tokens, 384);
  EXPECT_GT(s.cache.bytes, 0);
}

// A chat: each turn sends the whole conversation again and prefills only what is new.
TEST_F(PrefixCacheTest, EachTurnOfAChatPrefillsOnlyWhatIsNew) {
  std::vector<int32_t> conversation = tokens(30, 150);
  Engine engine(*model_, *tokenizer_, options(64 << 20, 96));
  int64_t last_point = 0;
  for (int turn = 0; turn < 4; ++turn) {
    SCOPED_TRACE(turn);
    const GenerationRequest request = greedy(conversation, "", 16);
    const Answer got = ask(engine, request);
    const Answer expected = [&] {
      Engine alone(*model_, *tokenizer_, options(0, 512));
      return ask(alone, request);
    }();
    expect_same(got, expected, "turn");
    EXPECT_EQ(got.cached, last_point);
    last_point = last_snapshot_point(int64_t(conversation.size()), kAlign);
    conversation = conversation + got.ids() + tokens(31 + uint64_t(turn), 40);
  }
}

// The same prefix with two continuations, one after the other and together: both resume from it.
TEST_F(PrefixCacheTest, BranchesOfOnePrefixBothResumeFromIt) {
  const std::vector<int32_t> prefix = tokens(40, 300);
  const std::vector<GenerationRequest> requests = {greedy(prefix), greedy(prefix + tokens(41, 50)),
                                                   greedy(prefix + tokens(42, 70))};
  const std::vector<Answer> expected = cold(requests);
  Engine engine(*model_, *tokenizer_, options(64 << 20, 128, 0));  // snapshots only near each end
  expect_same(ask(engine, requests[0]), expected[0], "prefix");
  Answer a, b;
  std::thread other([&] { b = ask(engine, requests[2]); });  // both branches at once
  a = ask(engine, requests[1]);
  other.join();
  expect_same(a, expected[1], "branch a");
  expect_same(b, expected[2], "branch b");
  EXPECT_EQ(a.cached, 256);
  EXPECT_EQ(b.cached, 256);
  const Answer again_a = ask(engine, requests[1]), again_b = ask(engine, requests[2]);
  expect_same(again_a, expected[1], "branch a again");
  expect_same(again_b, expected[2], "branch b again");
  EXPECT_EQ(again_a.cached, 320);  // its own snapshot from the first time
  EXPECT_EQ(again_b.cached, 320);
  const Answer same = ask(engine, requests[0]);  // the same prompt again
  expect_same(same, expected[0], "prefix again");
  EXPECT_EQ(same.cached, 256);
}

// A budget of two snapshots: the least recently used goes, and a prompt that lost its snapshot is
// prefilled again, with the same result.
TEST_F(PrefixCacheTest, ASmallBudgetDropsTheLeastRecentlyUsed) {
  std::vector<GenerationRequest> requests;
  for (uint64_t i = 0; i < 4; ++i) requests.push_back(greedy(tokens(50 + i, 140)));
  const std::vector<Answer> expected = cold(requests);
  const auto probe = model_->new_sequence();
  const int64_t snapshot = int64_t(probe->lightning_bytes() + probe->kv_bytes(128));
  Engine engine(*model_, *tokenizer_, options(2 * snapshot + snapshot / 2, 128, 0));
  for (size_t i = 0; i < 4; ++i) expect_same(ask(engine, requests[i]), expected[i], "first round");
  EngineStats s = engine.stats();
  EXPECT_EQ(s.cache.snapshots, 2);
  EXPECT_EQ(s.cache.evictions, 2);
  EXPECT_LE(s.cache.bytes, 2 * snapshot + snapshot / 2);
  const Answer evicted = ask(engine, requests[0]), kept = ask(engine, requests[3]);
  expect_same(evicted, expected[0], "evicted");
  expect_same(kept, expected[3], "kept");
  EXPECT_EQ(evicted.cached, 0);
  EXPECT_EQ(kept.cached, 128);
}

TEST_F(PrefixCacheTest, DifferentScopesNeverShare) {
  const std::vector<int32_t> prompt = tokens(60, 200);
  Engine engine(*model_, *tokenizer_, options(64 << 20));
  EXPECT_EQ(ask(engine, greedy(prompt, "alice")).cached, 0);
  EXPECT_EQ(ask(engine, greedy(prompt, "bob")).cached, 0);
  EXPECT_EQ(ask(engine, greedy(prompt, "")).cached, 0);
  EXPECT_EQ(ask(engine, greedy(prompt, "alice")).cached, 192);
  EXPECT_EQ(ask(engine, greedy(prompt, "bob")).cached, 192);
}

// Snapshot files outlive the engine: a new one over the same directory resumes from them.
TEST_F(PrefixCacheTest, SnapshotFilesAreFoundAfterARestart) {
  const std::vector<int32_t> document = tokens(70, 300);
  const std::vector<GenerationRequest> requests = {greedy(document + tokens(71, 20), "s"),
                                                   greedy(document + tokens(72, 30), "s")};
  const std::vector<Answer> expected = cold(requests);
  {
    Engine engine(*model_, *tokenizer_, on_disk());
    expect_same(ask(engine, requests[0]), expected[0], "first run");
  }  // finishes its writes
  size_t files = 0;
  for (const auto& f : fs::directory_iterator(dir_)) files += f.path().extension() == ".m1snap";
  EXPECT_EQ(files, 2u);  // the last point (256) and the last periodic one before it (192)
  Engine engine(*model_, *tokenizer_, on_disk());
  const Answer got = ask(engine, requests[1]);
  expect_same(got, expected[1], "after the restart");
  EXPECT_EQ(got.cached, 256);  // the first run's last point, within the shared 300 tokens
  EXPECT_EQ(engine.stats().cache.disk_hits, 1);
  EXPECT_EQ(ask(engine, requests[1]).cached, 320);  // its own last point, from memory
  EXPECT_EQ(engine.stats().cache.disk_hits, 1);
  EXPECT_EQ(ask(engine, greedy(requests[1].prompt, "other")).cached, 0);
}

// Damaged files, files of another precision and leftovers of interrupted writes are deleted, with
// a warning, and never used.
TEST_F(PrefixCacheTest, DamagedAndForeignFilesAreDeletedNeverUsed) {
  const std::vector<GenerationRequest> requests = {greedy(tokens(80, 300)), greedy(tokens(80, 300) + tokens(81, 9))};
  const std::vector<Answer> expected = cold(requests);
  {
    Engine engine(*model_, *tokenizer_, on_disk());
    ask(engine, requests[0]);
  }
  std::vector<fs::path> files;
  for (const auto& f : fs::directory_iterator(dir_)) files.push_back(f.path());
  ASSERT_EQ(files.size(), 2u);
  for (const fs::path& f : files) {  // a flipped byte in each file's KV rows
    std::string bytes = testing::read_file(f);
    bytes[bytes.size() - 20] ^= 0x40;
    std::ofstream(f, std::ios::binary) << bytes;
  }
  std::ofstream(dir_ / "0000000000000000.m1snap") << "not a snapshot";
  std::ofstream(dir_ / "0000000000000001.m1snap.tmp.999999999.0") << "half written";
  std::ofstream(dir_ / "notes.txt") << "not ours";
  {
    Engine engine(*model_, *tokenizer_, on_disk());
    EXPECT_EQ(engine.stats().cache.disk_rejected, 1);  // the one without a header, at once
    EXPECT_FALSE(fs::exists(dir_ / "0000000000000001.m1snap.tmp.999999999.0"));
    EXPECT_TRUE(fs::exists(dir_ / "notes.txt"));
    const Answer got = ask(engine, requests[1]);
    expect_same(got, expected[1], "with damaged files");
    EXPECT_EQ(got.cached, 0);
    EngineStats s = engine.stats();
    EXPECT_EQ(s.cache.disk_hits, 0);
    EXPECT_EQ(s.cache.disk_rejected, 3);  // both damaged files, found out when read
  }
  // What is there now was written again by that request, whole.
  const SnapshotFormat format = snapshot_format(*model_);
  for (const fs::path& f : files) {
    SnapshotFileInfo info;
    EXPECT_NO_THROW(read_snapshot_state(f, format, *model_, info)) << f;
  }
  // Files written in exact precision are foreign to a fast-precision backend: deleted at startup.
  {
    Engine engine(*model_, *tokenizer_, on_disk());
    ask(engine, requests[0]);
  }
  auto fast = create_backend(BackendOptions{"cpu", 2, Precision::kFast});
  auto fast_model = Model::load(kModel, *fast);
  Engine engine(*fast_model, *tokenizer_, on_disk());
  if (fast->numerics() != backend_->numerics()) {
    EXPECT_EQ(engine.stats().cache.disk_rejected, 2);
    EXPECT_EQ(engine.stats().cache.disk_files, 0);
  }
}

// Weights quantized at load are other weights: the same checkpoint loaded with --quantize (or
// another group size, or its LM head quantized too) never takes another load's snapshot files.
TEST_F(PrefixCacheTest, QuantizedLoadsHaveTheirOwnModelIdentity) {
  std::set<std::string> identities = {snapshot_format(*model_).model};
  const LoadOptions loads[] = {parse_load_options("int8", 0, false, 1), parse_load_options("int4", 0, false, 1),
                               parse_load_options("int4", 64, false, 1), parse_load_options("int4", 0, true, 1)};
  for (const LoadOptions& load : loads) {
    auto quantized = Model::load(kModel, *backend_, load);
    EXPECT_TRUE(identities.insert(snapshot_format(*quantized).model).second);
  }
  // And the identity is stable: the same load gives the same one.
  EXPECT_EQ(snapshot_format(*Model::load(kModel, *backend_, loads[1])).model,
            snapshot_format(*Model::load(kModel, *backend_, loads[1])).model);
}

// A step budget below the alignment cuts prompts where the rounding may change: such a prompt
// leaves no snapshot, so no later request can resume from a state a cold prefill would not reach.
TEST_F(PrefixCacheTest, APromptCutOffTheAlignmentLeavesNoSnapshot) {
  Engine engine(*model_, *tokenizer_, options(64 << 20, 48));
  const std::vector<int32_t> prompt = tokens(90, 200);
  EXPECT_EQ(ask(engine, greedy(prompt)).cached, 0);
  EXPECT_EQ(ask(engine, greedy(prompt)).cached, 0);
  EXPECT_EQ(engine.stats().cache.snapshots, 0);
}

TEST_F(PrefixCacheTest, BadOptionsAreRefused) {
  EngineOptions o = options(64 << 20);
  o.cache.every = -1;
  expect_error([&] { Engine(*model_, *tokenizer_, o); }, {"snapshot interval"});
  o = on_disk();
  o.cache.dir_max_bytes = 0;
  expect_error([&] { Engine(*model_, *tokenizer_, o); }, {"disk budget"});
  fs::create_directories(dir_);
  std::ofstream(dir_ / "file") << "x";
  o = on_disk();
  o.cache.dir = dir_ / "file";
  expect_error([&] { Engine(*model_, *tokenizer_, o); }, {"file: cannot use as the cache directory"});
}

}  // namespace
}  // namespace m1
