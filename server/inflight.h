#pragma once
// The requests being answered right now, so that shutdown can wait for them to finish and
// cancel those that outlast its grace period.

#include <chrono>
#include <condition_variable>
#include <list>
#include <memory>
#include <mutex>

#include "m1/engine.h"

namespace m1::server {

class InflightRequests {
 public:
  // Keeps a request in the set for as long as the ticket lives.
  class Ticket {
   public:
    ~Ticket();
    Ticket(const Ticket&) = delete;
    Ticket& operator=(const Ticket&) = delete;

   private:
    friend class InflightRequests;
    using Position = std::list<std::shared_ptr<RequestStream>>::iterator;
    Ticket(InflightRequests& set, Position position) : set_(set), position_(position) {}
    InflightRequests& set_;
    Position position_;
  };

  std::unique_ptr<Ticket> track(std::shared_ptr<RequestStream> stream);
  // True once none are left; false if the deadline came first.
  bool wait_until_empty(std::chrono::steady_clock::time_point deadline);
  void cancel_all();

 private:
  std::mutex mutex_;
  std::condition_variable emptied_;
  std::list<std::shared_ptr<RequestStream>> streams_;
};

}  // namespace m1::server
