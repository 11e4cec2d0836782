#pragma once
// The threads of a tensor-parallel group: one per rank, each bound once to its rank's backend,
// that run one function per rank together and wait for all of them (the ranks of a step in
// lockstep). A rank that throws has the group told at once, so that peers waiting for it in a
// collective fail instead of waiting for ever; the first exception is rethrown to the caller.

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace m1 {

class Lockstep {
 public:
  // `attach(rank)` runs first on each rank's thread; `on_failure(rank, what)` runs on the thread
  // of a rank whose function threw, before the others are waited for.
  Lockstep(int ranks, std::function<void(int)> attach, std::function<void(int, const std::string&)> on_failure);
  ~Lockstep();
  Lockstep(const Lockstep&) = delete;
  Lockstep& operator=(const Lockstep&) = delete;

  int ranks() const { return int(threads_.size()); }
  // fn(rank) on every rank's thread; returns when all have returned. Calls are serialised.
  void run(const std::function<void(int)>& fn);

 private:
  void loop(int rank);

  std::function<void(int)> attach_;
  std::function<void(int, const std::string&)> on_failure_;
  std::mutex run_mutex_;  // one run at a time
  std::mutex mutex_;
  std::condition_variable start_, done_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int remaining_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::vector<std::thread> threads_;
};

}  // namespace m1
