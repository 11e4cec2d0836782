#include "sse_stream.h"

#include <spdlog/spdlog.h>

#include "api_error.h"

namespace m1::server {
namespace {

// How long one provider call waits for an event before checking that the client is still there.
constexpr std::chrono::milliseconds kPollInterval{100};

bool write_text(httplib::DataSink& sink, const std::string& text) { return sink.write(text.data(), text.size()); }

bool write_event(httplib::DataSink& sink, const ordered_json& data) {
  return write_text(sink, "data: " + dump_json(data) + "\n\n");
}

}  // namespace

SseStream::SseStream(ChunkStreamer streamer, std::shared_ptr<RequestStream> stream,
                     std::unique_ptr<InflightRequests::Ticket> ticket)
    : streamer_(std::move(streamer)), stream_(std::move(stream)), ticket_(std::move(ticket)) {}

SseStream::~SseStream() { stream_->cancel(); }

bool SseStream::pump(httplib::DataSink& sink) {
  try {
    return pump_events(sink);
  } catch (const ApiError& error) {
    return write_error(sink, error);
  } catch (const std::exception& error) {
    spdlog::error("streaming a response failed: {}", error.what());
    return write_error(sink, ApiError(500, "server_error", "internal error while streaming"));
  }
}

bool SseStream::pump_events(httplib::DataSink& sink) {
  if (!opened_) {
    opened_ = true;
    for (const ordered_json& chunk : streamer_.opening())
      if (!write_event(sink, chunk)) return false;
  }
  const auto event = stream_->next(kPollInterval);
  if (!event) return sink.is_writable();  // an idle stream still notices a client that left
  for (const ordered_json& chunk : streamer_.on_event(*event))
    if (!write_event(sink, chunk)) return false;
  return event->kind == GenerationEvent::Kind::kDone ? finish(sink) : true;
}

// The status line is long gone: an error travels as an event, as OpenAI's streams send them.
bool SseStream::write_error(httplib::DataSink& sink, const ApiError& error) {
  stream_->cancel();  // the other choices of a failed request stop too
  return write_event(sink, error_json(error)) && finish(sink);
}

bool SseStream::finish(httplib::DataSink& sink) {
  if (!write_text(sink, "data: [DONE]\n\n")) return false;
  sink.done();
  return true;
}

}  // namespace m1::server
