#pragma once
// Prometheus metrics: HTTP responses by status code, plus the engine's counters, gauges and
// latency histograms, written in the Prometheus text exposition format.

#include <cstdint>
#include <map>
#include <mutex>
#include <string>

#include "m1/engine.h"

namespace m1::server {

// Responses sent, by HTTP status code. Thread-safe.
class ResponseCounter {
 public:
  void count(int status);
  std::map<int, int64_t> by_status() const;

 private:
  mutable std::mutex mutex_;
  std::map<int, int64_t> counts_;
};

std::string prometheus_text(const std::map<int, int64_t>& responses_by_status, const EngineStats& engine);

}  // namespace m1::server
