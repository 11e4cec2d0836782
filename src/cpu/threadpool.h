#pragma once
// A persistent pool of worker threads for data-parallel loops: the caller runs tasks too, and
// tasks are handed out one index at a time so uneven tasks still balance. Workers spin briefly
// between loops before sleeping, since a decode step runs hundreds of short loops back to back.

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace m1::cpu {

class ThreadPool {
 public:
  // threads: total, including the caller; 0 means one per core. With `cpus`, the workers are
  // pinned to those cores (the caller pins itself, if it wants to).
  explicit ThreadPool(int threads, std::vector<int> cpus = {});
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }

  // Runs fn(i) for i in [0, tasks) across the pool and waits for all. Not re-entrant: fn must not
  // call parallel_for. An exception from a task is rethrown here after all tasks stopped.
  template <class Fn>
  void parallel_for(int64_t tasks, Fn&& fn) {
    if (tasks <= 0) return;
    if (tasks == 1 || workers_.empty()) {
      for (int64_t i = 0; i < tasks; ++i) fn(i);
      return;
    }
    run(tasks, [](void* ctx, int64_t i) { (*static_cast<Fn*>(ctx))(i); }, &fn);
  }

 private:
  using TaskFn = void (*)(void*, int64_t);
  void run(int64_t tasks, TaskFn fn, void* ctx);
  void work_on_current_job();
  void worker_loop();
  // Waits until `generation_` differs from `seen` (or the pool stops): spinning, then sleeping.
  bool wait_for_job(uint64_t seen);

  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stopping_{false};
  std::atomic<int> busy_workers_{0};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;

  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::exception_ptr error_;
  std::mutex error_mutex_;
};

}  // namespace m1::cpu
