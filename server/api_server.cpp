#include "api_server.h"

#include <sys/socket.h>

#include <algorithm>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "client_connection.h"
#include "completion_output.h"
#include "json_body.h"
#include "m1/content_hash.h"
#include "m1/error.h"
#include "openai_json.h"
#include "sse_stream.h"
#include "tokenize_api.h"

namespace m1::server {
namespace {

using Clock = std::chrono::steady_clock;

// After the grace period, cancelled requests still need a step of the engine to end.
constexpr std::chrono::seconds kCancelWait{5};

int64_t unix_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void send_json(httplib::Response& response, int status, const ordered_json& body) {
  response.status = status;
  response.set_content(dump_json(body), "application/json");
}

void send_error(httplib::Response& response, const ApiError& error) {
  if (error.status == 503) response.set_header("Retry-After", "1");
  send_json(response, error.status, error_json(error));
}

std::shared_ptr<RequestStream> submit(Engine& engine, GenerationRequest request) {
  try {
    return engine.submit(std::move(request));
  } catch (const EngineBusy& busy) {
    throw ApiError(503, "server_busy", busy.what(), {}, "server_busy");
  } catch (const Error& error) {
    throw invalid_request_from(error);
  }
}

// httplib holds form-encoded bodies (what `curl -d` sends) to a fixed 8 KiB.
std::string too_large_message(const httplib::Request& request, size_t limit) {
  if (request.get_header_value("Content-Type") == "application/x-www-form-urlencoded")
    return "form-encoded request body too large: send JSON with Content-Type: application/json";
  return fmt::format("request body is larger than the limit of {} bytes", limit);
}

// How long a whole response's handler waits for an event before asking whether its client left.
constexpr std::chrono::milliseconds kClientCheckInterval{100};

// nginx's code for a request whose client closed the connection first: counted in /metrics, and
// written to nobody.
constexpr int kClientClosedRequest = 499;

// The identity of the API key in cache scopes: a hash, so that the key itself is not written into
// cache files. With several keys, each request's would be that of the key it presented.
std::string key_identity(const std::string& api_key) {
  if (api_key.empty()) return {};
  ContentHash h;
  h.update(api_key);
  return fmt::format("{:016x}", h.value());
}

}  // namespace

const std::vector<ApiServer::Route> ApiServer::kRoutes = {
    {"GET", "/health", &ApiServer::health, false},
    {"GET", "/metrics", &ApiServer::metrics, true},
    {"GET", "/v1/models", &ApiServer::models, true},
    {"POST", "/v1/chat/completions", &ApiServer::chat_completions, true},
    {"POST", "/v1/completions", &ApiServer::completions, true},
    {"POST", "/tokenize", &ApiServer::tokenize, true},
    {"POST", "/detokenize", &ApiServer::detokenize, true},
};

ApiServer::ApiServer(HttpOptions options)
    : options_(std::move(options)), started_at_(unix_seconds()), key_identity_(key_identity(options_.api_key)) {
  http_.new_task_queue = [threads = options_.threads] { return new httplib::ThreadPool(threads); };
  http_.set_socket_options([this](socket_t socket) { prepare_listening_socket(socket); });
  http_.set_payload_max_length(options_.max_body_bytes);
  http_.set_error_handler(httplib::Server::HandlerWithResponse(
      [this](const httplib::Request& request, httplib::Response& response) { return on_http_error(request, response); }));
  // Counted once the status is final and before anything is written, so that a client that has
  // its answer finds it counted by the next /metrics (the logger runs after the write).
  http_.set_post_routing_handler(
      [this](const httplib::Request&, httplib::Response& response) { responses_.count(response.status); });
  http_.set_logger([](const httplib::Request& request, const httplib::Response& response) {
    spdlog::debug("{} {} -> {}", request.method, request.path, response.status);
  });
  add_routes();
}

int ApiServer::bind(const std::string& host, int port) {
  const int bound = port == 0 ? http_.bind_to_any_port(host) : (http_.bind_to_port(host, port) ? port : -1);
  if (bound < 0) fail("cannot listen on {}:{} (address in use or not available)", host, port);
  // httplib listens with a backlog of 5, built into the library: a burst of clients connecting
  // at once overflows it and some of them have their connection reset. Listening again on the
  // bound socket raises the backlog.
  ::listen(listening_socket_, SOMAXCONN);
  serving_.store(true);
  return bound;
}

// httplib's default sets SO_REUSEPORT, with which a second server binds a port already served
// and takes a share of its connections; SO_REUSEADDR alone still allows a quick restart.
void ApiServer::prepare_listening_socket(socket_t socket) {
  const int yes = 1;
  ::setsockopt(socket, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  listening_socket_ = socket;
}

void ApiServer::listen() {
  http_.listen_after_bind();
  serving_.store(false);
}

void ApiServer::set_model(ModelService& model) { model_.store(&model); }

void ApiServer::drain(std::chrono::milliseconds grace) {
  draining_.store(true);
  if (inflight_.wait_until_empty(Clock::now() + grace)) return;
  spdlog::warn("cancelling the requests still running after the shutdown grace period");
  inflight_.cancel_all();
  inflight_.wait_until_empty(Clock::now() + kCancelWait);
}

// httplib's stop() does nothing until listen() is running: a stop that came first (a model that
// fails to load at once) left listen() accepting for ever. So it is repeated until listen() returns.
void ApiServer::stop() {
  while (serving_.load()) {
    http_.stop();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

void ApiServer::add_routes() {
  for (const Route& route : kRoutes) {
    auto handler = [this, &route](const httplib::Request& request, httplib::Response& response) {
      guarded(route, request, response);
    };
    if (std::string_view(route.method) == "GET")
      http_.Get(route.path, handler);
    else
      http_.Post(route.path, handler);
  }
}

// Whatever a handler throws becomes an OpenAI error; nothing a client sends can crash the server.
void ApiServer::guarded(const Route& route, const httplib::Request& request, httplib::Response& response) {
  try {
    if (route.needs_key) check_api_key(request);
    (this->*route.handler)(request, response);
  } catch (const ApiError& error) {
    send_error(response, error);
  } catch (const Error& error) {
    send_error(response, invalid_request_from(error));
  } catch (const std::exception& error) {
    spdlog::error("{} {} failed: {}", request.method, request.path, error.what());
    send_error(response, ApiError(500, "server_error", "internal error"));
  } catch (...) {
    spdlog::error("{} {} failed with an unknown exception", request.method, request.path);
    send_error(response, ApiError(500, "server_error", "internal error"));
  }
}

void ApiServer::check_api_key(const httplib::Request& request) const {
  if (options_.api_key.empty()) return;
  const std::string given = request.get_header_value("Authorization");
  if (given == "Bearer " + options_.api_key) return;
  const char* message = given.empty() ? "missing API key: send the header Authorization: Bearer <key>" : "incorrect API key";
  throw ApiError(401, "authentication_error", message, {}, "invalid_api_key");
}

// Errors httplib finds itself (no route, body too large) get the OpenAI shape too; responses
// that already carry a body are the handlers' own.
httplib::Server::HandlerResponse ApiServer::on_http_error(const httplib::Request& request, httplib::Response& response) {
  if (!response.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
  const auto same_path = std::find_if(kRoutes.begin(), kRoutes.end(),
                                      [&](const Route& route) { return request.path == route.path; });
  if (response.status == 404 && same_path != kRoutes.end()) {
    response.set_header("Allow", same_path->method);
    send_error(response, ApiError(405, "invalid_request_error",
                                  fmt::format("{} {}: method not allowed (use {})", request.method, request.path,
                                              same_path->method),
                                  {}, "method_not_allowed"));
  } else if (response.status == 404) {
    send_error(response, not_found(fmt::format("{} {}: no such endpoint", request.method, request.path)));
  } else if (response.status == 413) {
    send_error(response, ApiError(413, "invalid_request_error", too_large_message(request, options_.max_body_bytes), {},
                                  "request_too_large"));
  } else {
    send_error(response, ApiError(response.status, "invalid_request_error", "malformed HTTP request"));
  }
  return httplib::Server::HandlerResponse::Handled;
}

ModelService& ApiServer::ready_model() {
  if (draining_.load()) throw unavailable("the server is shutting down", "shutting_down");
  ModelService* model = model_.load();
  if (model == nullptr) throw unavailable("the model is still loading; retry shortly", "model_loading");
  return *model;
}

void ApiServer::health(const httplib::Request&, httplib::Response& response) {
  const char* status = draining_.load() ? "shutting_down" : model_.load() == nullptr ? "loading" : "ok";
  send_json(response, std::string_view(status) == "ok" ? 200 : 503, {{"status", status}});
}

void ApiServer::models(const httplib::Request&, httplib::Response& response) {
  const ServedModel& served = ready_model().served();
  send_json(response, 200, model_list_json(served.name, started_at_, served.max_context));
}

void ApiServer::metrics(const httplib::Request&, httplib::Response& response) {
  const EngineStats stats = ready_model().engine().stats();
  response.set_content(prometheus_text(responses_.by_status(), stats), "text/plain; version=0.0.4");
}

void ApiServer::chat_completions(const httplib::Request& request, httplib::Response& response) {
  answer_completion(request, response, ApiKind::kChat);
}

void ApiServer::completions(const httplib::Request& request, httplib::Response& response) {
  answer_completion(request, response, ApiKind::kCompletion);
}

void ApiServer::tokenize(const httplib::Request& request, httplib::Response& response) {
  const ServedModel& served = ready_model().served();
  send_json(response, 200, tokenize_json(parse_json_body(request.body), served));
}

void ApiServer::detokenize(const httplib::Request& request, httplib::Response& response) {
  const ServedModel& served = ready_model().served();
  send_json(response, 200, detokenize_json(parse_json_body(request.body), served));
}

void ApiServer::answer_completion(const httplib::Request& request, httplib::Response& response, ApiKind kind) {
  ModelService& model = ready_model();
  const ordered_json body = parse_json_body(request.body);
  CompletionJob job = kind == ApiKind::kChat ? parse_chat_request(body, model.served())
                                             : parse_completion_request(body, model.served());
  job.generation.cache_scope = cache_scope(key_identity_, job.cache_salt);
  ResponseMeta meta{new_response_id(kind), unix_seconds(), model.served().name};
  if (job.stream)
    answer_stream(response, model, std::move(job), std::move(meta));
  else
    answer_whole(request, response, model, std::move(job), std::move(meta));
}

// A client that leaves before its whole response is ready cancels the request, as a stream's does
// at its next write: the batch slot goes to the requests whose clients still wait.
void ApiServer::answer_whole(const httplib::Request& request, httplib::Response& response, ModelService& model,
                             CompletionJob job, ResponseMeta meta) {
  ResponseCollector collector(job, *model.served().tokenizer, std::move(meta));
  const auto stream = submit(model.engine(), std::move(job.generation));
  const auto ticket = inflight_.track(stream);
  ClientConnection client(request);
  auto next_check = Clock::now() + kClientCheckInterval;
  try {
    for (;;) {
      if (auto event = stream->next(kClientCheckInterval))
        if (collector.add(std::move(*event))) break;
      const auto now = Clock::now();
      if (now < next_check) continue;
      next_check = now + kClientCheckInterval;
      if (!client.left()) continue;
      stream->cancel();
      spdlog::info("{} {}: the client left before its response was ready; request cancelled", request.method,
                   request.path);
      send_error(response, ApiError(kClientClosedRequest, "invalid_request_error",
                                    "the client closed the connection before the response was ready", {},
                                    "client_closed_request"));
      return;
    }
  } catch (...) {
    stream->cancel();
    throw;
  }
  send_json(response, 200, collector.response());
}

void ApiServer::answer_stream(httplib::Response& response, ModelService& model, CompletionJob job, ResponseMeta meta) {
  ChunkStreamer streamer(job, *model.served().tokenizer, std::move(meta));
  auto stream = submit(model.engine(), std::move(job.generation));
  auto ticket = inflight_.track(stream);
  auto sse = std::make_shared<SseStream>(std::move(streamer), std::move(stream), std::move(ticket));
  response.set_header("Cache-Control", "no-cache");
  response.set_chunked_content_provider(
      "text/event-stream", [sse](size_t, httplib::DataSink& sink) { return sse->pump(sink); });
}

}  // namespace m1::server
