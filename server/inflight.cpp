#include "inflight.h"

namespace m1::server {

InflightRequests::Ticket::~Ticket() {
  std::lock_guard lock(set_.mutex_);
  set_.streams_.erase(position_);
  if (set_.streams_.empty()) set_.emptied_.notify_all();
}

std::unique_ptr<InflightRequests::Ticket> InflightRequests::track(std::shared_ptr<RequestStream> stream) {
  std::lock_guard lock(mutex_);
  streams_.push_front(std::move(stream));
  return std::unique_ptr<Ticket>(new Ticket(*this, streams_.begin()));
}

bool InflightRequests::wait_until_empty(std::chrono::steady_clock::time_point deadline) {
  std::unique_lock lock(mutex_);
  return emptied_.wait_until(lock, deadline, [&] { return streams_.empty(); });
}

void InflightRequests::cancel_all() {
  std::lock_guard lock(mutex_);
  for (const auto& stream : streams_) stream->cancel();
}

}  // namespace m1::server
