#include "lockstep.h"

#include <utility>

namespace m1 {

Lockstep::Lockstep(int ranks, std::function<void(int)> attach, std::function<void(int, const std::string&)> on_failure)
    : attach_(std::move(attach)), on_failure_(std::move(on_failure)) {
  for (int r = 0; r < ranks; ++r) threads_.emplace_back([this, r] { loop(r); });
}

Lockstep::~Lockstep() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  start_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void Lockstep::run(const std::function<void(int)>& fn) {
  std::lock_guard serial(run_mutex_);
  std::unique_lock lock(mutex_);
  job_ = &fn;
  remaining_ = ranks();
  error_ = nullptr;
  ++generation_;
  start_.notify_all();
  done_.wait(lock, [&] { return remaining_ == 0; });
  job_ = nullptr;
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void Lockstep::loop(int rank) {
  std::exception_ptr attach_error;
  try {
    attach_(rank);
  } catch (...) {
    attach_error = std::current_exception();  // reported by every run, which cannot work here
  }
  uint64_t seen = 0;
  for (;;) {
    const std::function<void(int)>* job = nullptr;
    {
      std::unique_lock lock(mutex_);
      start_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      job = job_;
    }
    std::exception_ptr error = attach_error;
    if (!error) {
      try {
        (*job)(rank);
      } catch (...) {
        error = std::current_exception();
      }
    }
    if (error) {
      std::string what = "an unknown error";
      try {
        std::rethrow_exception(error);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      on_failure_(rank, what);
    }
    std::lock_guard lock(mutex_);
    if (error && !error_) error_ = error;
    if (--remaining_ == 0) done_.notify_all();
  }
}

}  // namespace m1
