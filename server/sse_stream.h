#pragma once
// Sends one request's answer as Server-Sent Events over an HTTP chunked response: `data: {chunk}`
// events as the engine produces tokens, then `data: [DONE]`. When the client goes away the
// request is cancelled, so the engine frees its sequences at the next step.

#include <chrono>
#include <memory>

#include <httplib.h>

#include "api_error.h"
#include "completion_output.h"
#include "inflight.h"
#include "m1/engine.h"

namespace m1::server {

class SseStream {
 public:
  SseStream(ChunkStreamer streamer, std::shared_ptr<RequestStream> stream,
            std::unique_ptr<InflightRequests::Ticket> ticket);
  ~SseStream();  // cancels the request: a no-op once it ended, needed when the response was cut short
  SseStream(const SseStream&) = delete;
  SseStream& operator=(const SseStream&) = delete;

  // One call of httplib's chunked content provider: waits briefly for the next event and
  // writes what it makes. Returns false to abort the response (the client is gone).
  bool pump(httplib::DataSink& sink);

 private:
  bool pump_events(httplib::DataSink& sink);
  bool write_error(httplib::DataSink& sink, const ApiError& error);
  bool finish(httplib::DataSink& sink);

  ChunkStreamer streamer_;
  std::shared_ptr<RequestStream> stream_;
  std::unique_ptr<InflightRequests::Ticket> ticket_;
  bool opened_ = false;
};

}  // namespace m1::server
