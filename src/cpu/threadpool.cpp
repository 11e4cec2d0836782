#include "cpu/threadpool.h"

#include "cpu/numa.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <utility>

namespace m1::cpu {
namespace {

// How long an idle worker keeps polling for the next loop before it sleeps.
constexpr auto kSpinTime = std::chrono::microseconds(200);

}  // namespace

ThreadPool::ThreadPool(int threads, std::vector<int> cpus) {
  if (threads <= 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 1; i < threads; ++i)
    workers_.emplace_back([this, cpus] {
      try {
        pin_current_thread(cpus);
      } catch (const std::exception&) {
        // Unpinned, the worker still computes right: only its memory may be farther away.
      }
      worker_loop();
    });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(sleep_mutex_);
    stopping_.store(true);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::work_on_current_job() {
  for (int64_t i; (i = next_task_.fetch_add(1, std::memory_order_relaxed)) < tasks_;) {
    try {
      fn_(ctx_, i);
    } catch (...) {
      std::lock_guard lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
      next_task_.store(tasks_, std::memory_order_relaxed);  // skip the rest
    }
  }
}

void ThreadPool::run(int64_t tasks, TaskFn fn, void* ctx) {
  fn_ = fn;
  ctx_ = ctx;
  tasks_ = tasks;
  next_task_.store(0, std::memory_order_relaxed);
  busy_workers_.store(int(workers_.size()), std::memory_order_relaxed);
  {
    // Publishing under the lock means a worker about to sleep either sees the new generation or
    // is already waiting when notified.
    std::lock_guard lock(sleep_mutex_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
  work_on_current_job();
  while (busy_workers_.load(std::memory_order_acquire) > 0) _mm_pause();
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

bool ThreadPool::wait_for_job(uint64_t seen) {
  const auto give_up = std::chrono::steady_clock::now() + kSpinTime;
  while (generation_.load(std::memory_order_acquire) == seen && !stopping_.load(std::memory_order_relaxed)) {
    for (int i = 0; i < 64; ++i) _mm_pause();
    if (std::chrono::steady_clock::now() < give_up) continue;
    std::unique_lock lock(sleep_mutex_);
    sleepers_.fetch_add(1);
    wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen || stopping_.load(); });
    sleepers_.fetch_sub(1);
  }
  return !stopping_.load();
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  while (wait_for_job(seen)) {
    seen = generation_.load(std::memory_order_acquire);
    work_on_current_job();
    busy_workers_.fetch_sub(1, std::memory_order_release);
  }
}

}  // namespace m1::cpu
