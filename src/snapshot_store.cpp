#include "snapshot_store.h"

#include <algorithm>
#include <chrono>

#include <spdlog/spdlog.h>

#include "m1/content_hash.h"
#include "m1/error.h"

namespace m1 {
namespace {

namespace fs = std::filesystem;

constexpr std::string_view kSuffix = ".m1snap";

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(fs::file_time_type::clock::now().time_since_epoch()).count();
}

int64_t modified_ns(const fs::path& path) {
  std::error_code ec;
  const auto time = fs::last_write_time(path, ec);
  return ec ? 0 : std::chrono::duration_cast<std::chrono::nanoseconds>(time.time_since_epoch()).count();
}

void set_modified_ns(const fs::path& path, int64_t ns) {
  std::error_code ignored;
  fs::last_write_time(path, fs::file_time_type(std::chrono::nanoseconds(ns)), ignored);
}

// A temporary file of an interrupted write: NAME.m1snap.tmp.PID.N whose process has gone.
bool abandoned_temporary(const std::string& name) {
  const size_t at = name.find(std::string(kSuffix) + ".tmp.");
  if (at == std::string::npos) return false;
  const std::string pid = name.substr(at + kSuffix.size() + 5, name.find('.', at + kSuffix.size() + 5) - at - kSuffix.size() - 5);
  std::error_code ec;
  return pid.empty() || pid.find_first_not_of("0123456789") != std::string::npos || !fs::exists("/proc/" + pid, ec);
}

bool starts_with(std::span<const int32_t> tokens, const std::vector<int32_t>& prefix) {
  return prefix.size() <= tokens.size() && std::equal(prefix.begin(), prefix.end(), tokens.begin());
}

}  // namespace

SnapshotStore::SnapshotStore(std::filesystem::path dir, int64_t max_bytes, SnapshotFormat format)
    : dir_(std::move(dir)), max_bytes_(max_bytes), format_(std::move(format)) {
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec || !fs::is_directory(dir_, ec)) fail("{}: cannot use as the cache directory: {}", dir_.string(), ec.message());
  scan();
  thread_ = std::thread([this] { writer(); });
}

SnapshotStore::~SnapshotStore() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

// Reads every snapshot file's header; the unusable are deleted, then the budget is enforced.
void SnapshotStore::scan() {
  std::error_code ec;
  fs::directory_iterator it(dir_, ec);
  if (ec) fail("{}: cannot read the cache directory: {}", dir_.string(), ec.message());
  std::lock_guard lock(mutex_);
  for (const fs::directory_entry& file : it) {
    const std::string name = file.path().filename().string();
    if (abandoned_temporary(name)) {
      fs::remove(file.path(), ec);
      continue;
    }
    if (!name.ends_with(kSuffix) || !file.is_regular_file(ec)) continue;
    try {
      SnapshotFileInfo info = read_snapshot_info(file.path(), format_);
      entries_[file.path()] = Entry{std::move(info.scope), std::move(info.tokens), info.file_bytes, modified_ns(file.path())};
      stats_.bytes += int64_t(info.file_bytes);
    } catch (const SnapshotFileError& error) {
      reject(file.path(), error.what());
    }
  }
  stats_.files = int64_t(entries_.size());
  evict_to_budget();
  if (!entries_.empty())
    spdlog::info("prefix cache: {} snapshot files ({:.1f} MiB) in {}", entries_.size(), double(stats_.bytes) / (1 << 20),
                 dir_.string());
}

std::optional<SnapshotStore::Match> SnapshotStore::find(const std::string& scope, std::span<const int32_t> tokens,
                                                        int64_t limit) const {
  std::lock_guard lock(mutex_);
  std::optional<Match> best;
  for (const auto& [path, e] : entries_) {
    const int64_t length = int64_t(e.tokens.size());
    if (e.scope == scope && length <= limit && (!best || length > best->tokens) && starts_with(tokens, e.tokens))
      best = Match{length, path};
  }
  return best;
}

bool SnapshotStore::holds(const std::string& scope, std::span<const int32_t> tokens) const {
  const fs::path path = path_of(scope, tokens);
  std::lock_guard lock(mutex_);
  const auto it = entries_.find(path);
  const bool stored = it != entries_.end() && it->second.scope == scope &&
                      std::equal(tokens.begin(), tokens.end(), it->second.tokens.begin(), it->second.tokens.end());
  return stored || queued_.contains(path);
}

void SnapshotStore::write(const std::string& scope, std::span<const int32_t> tokens, SnapshotTree::Found snapshot) {
  {
    std::lock_guard lock(mutex_);
    queued_.insert(path_of(scope, tokens));
    jobs_.push_back(Job{scope, {tokens.begin(), tokens.end()}, std::move(snapshot)});
  }
  wake_.notify_one();
}

std::unique_ptr<SequenceState> SnapshotStore::load(const Match& match, const std::string& scope,
                                                   std::span<const int32_t> tokens, const Model& model) {
  std::error_code ec;
  if (!fs::exists(match.path, ec)) {  // deleted under the budget since find()
    std::lock_guard lock(mutex_);
    if (entries_.erase(match.path) > 0) stats_.files = int64_t(entries_.size());
    return nullptr;
  }
  try {
    SnapshotFileInfo info;
    auto state = read_snapshot_state(match.path, format_, model, info);
    if (info.scope != scope || int64_t(info.tokens.size()) != match.tokens || !starts_with(tokens, info.tokens))
      throw SnapshotFileError("holds another prefix than its index entry");
    const int64_t now = now_ns();
    set_modified_ns(match.path, now);
    std::lock_guard lock(mutex_);
    if (auto it = entries_.find(match.path); it != entries_.end()) it->second.used = now;
    return state;
  } catch (const SnapshotFileError& error) {
    std::lock_guard lock(mutex_);
    reject(match.path, error.what());
    return nullptr;
  }
}

void SnapshotStore::flush() {
  std::unique_lock lock(mutex_);
  idle_.wait(lock, [&] { return jobs_.empty() && !writing_; });
}

SnapshotStore::Stats SnapshotStore::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

void SnapshotStore::writer() {
  std::unique_lock lock(mutex_);
  for (;;) {
    wake_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
    if (jobs_.empty()) return;  // stopping, with every queued write done
    Job job = std::move(jobs_.front());
    jobs_.pop_front();
    writing_ = true;
    lock.unlock();
    store(job);
    job = {};  // releases the pieces outside the lock
    lock.lock();
    writing_ = false;
    if (jobs_.empty()) idle_.notify_all();
  }
}

void SnapshotStore::store(Job& job) {
  const fs::path path = path_of(job.scope, job.tokens);
  const uint64_t bytes = job.snapshot.pieces.bytes() + job.tokens.size() * sizeof(int32_t);
  bool written = false;
  if (int64_t(bytes) <= max_bytes_) {
    try {
      write_snapshot_file(path, format_, job.scope, job.tokens, job.snapshot.pieces);
      written = true;
    } catch (const std::exception& error) {
      spdlog::warn("prefix cache: {}", error.what());  // e.g. the disk is full: the cache goes on without it
    }
  }
  std::lock_guard lock(mutex_);
  queued_.erase(path);
  if (!written) return;
  std::error_code ec;
  const uint64_t size = fs::file_size(path, ec);
  if (auto old = entries_.find(path); old != entries_.end()) stats_.bytes -= int64_t(old->second.bytes);
  entries_[path] = Entry{std::move(job.scope), std::move(job.tokens), ec ? bytes : size, modified_ns(path)};
  stats_.bytes += int64_t(entries_[path].bytes);
  stats_.files = int64_t(entries_.size());
  ++stats_.writes;
  evict_to_budget();
}

void SnapshotStore::reject(const fs::path& path, const std::string& why) {
  spdlog::warn("prefix cache: {}: skipped and deleted: {}", path.string(), why);
  std::error_code ignored;
  fs::remove(path, ignored);
  if (auto it = entries_.find(path); it != entries_.end()) {
    stats_.bytes -= int64_t(it->second.bytes);
    entries_.erase(it);
  }
  stats_.files = int64_t(entries_.size());
  ++stats_.rejected;
}

void SnapshotStore::evict_to_budget() {
  while (stats_.bytes > max_bytes_ && !entries_.empty()) {
    const auto oldest = std::min_element(entries_.begin(), entries_.end(),
                                         [](const auto& a, const auto& b) { return a.second.used < b.second.used; });
    std::error_code ignored;
    fs::remove(oldest->first, ignored);
    stats_.bytes -= int64_t(oldest->second.bytes);
    entries_.erase(oldest);
  }
  stats_.files = int64_t(entries_.size());
}

// Named by what it holds, so the same prefix in the same scope is always the same file.
fs::path SnapshotStore::path_of(const std::string& scope, std::span<const int32_t> tokens) const {
  ContentHash h;
  h.update(scope);
  h.update_value(uint64_t(scope.size()));
  h.update(tokens.data(), tokens.size_bytes());
  return dir_ / fmt::format("{:016x}{}", h.value(), kSuffix);
}

}  // namespace m1
