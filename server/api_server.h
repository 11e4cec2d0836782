#pragma once
// The HTTP side of m1-serve on cpp-httplib: routes, API-key checks, OpenAI-shaped errors for
// everything that goes wrong (unknown path, wrong method, oversized body, exceptions), readiness
// while the model loads, and draining at shutdown.

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

#include <httplib.h>

#include "api_error.h"
#include "inflight.h"
#include "metrics.h"
#include "model_service.h"
#include "openai_json.h"
#include "openai_request.h"

namespace m1::server {

struct HttpOptions {
  std::string api_key;                  // empty: no authentication
  size_t max_body_bytes = size_t(8) << 20;
  size_t threads = 64;                  // connections served at once (each stream holds one)
};

class ApiServer {
 public:
  explicit ApiServer(HttpOptions options);

  // Binds the listening socket (port 0: any free port) and returns the port. Throws m1::Error.
  int bind(const std::string& host, int port);
  // Serves until stop(); blocks, so it runs on a thread of its own. Every bind() is followed by
  // one listen().
  void listen();
  // Starts serving the model endpoints; until then they answer 503. The model must outlive
  // the server's use of it.
  void set_model(ModelService& model);
  // Refuses new requests (503), gives those in flight `grace` to finish, then cancels the rest.
  void drain(std::chrono::milliseconds grace);
  // Ends listen(), also when it has not started yet; returns once it has.
  void stop();

 private:
  using Handler = void (ApiServer::*)(const httplib::Request&, httplib::Response&);
  struct Route {
    const char* method;
    const char* path;
    Handler handler;
    bool needs_key;
  };

  void prepare_listening_socket(socket_t socket);
  void add_routes();
  void guarded(const Route& route, const httplib::Request& request, httplib::Response& response);
  void check_api_key(const httplib::Request& request) const;
  httplib::Server::HandlerResponse on_http_error(const httplib::Request& request, httplib::Response& response);
  ModelService& ready_model();

  void health(const httplib::Request& request, httplib::Response& response);
  void models(const httplib::Request& request, httplib::Response& response);
  void metrics(const httplib::Request& request, httplib::Response& response);
  void chat_completions(const httplib::Request& request, httplib::Response& response);
  void completions(const httplib::Request& request, httplib::Response& response);
  void tokenize(const httplib::Request& request, httplib::Response& response);
  void detokenize(const httplib::Request& request, httplib::Response& response);

  void answer_completion(const httplib::Request& request, httplib::Response& response, ApiKind kind);
  void answer_whole(const httplib::Request& request, httplib::Response& response, ModelService& model, CompletionJob job,
                    ResponseMeta meta);
  void answer_stream(httplib::Response& response, ModelService& model, CompletionJob job, ResponseMeta meta);

  static const std::vector<Route> kRoutes;

  HttpOptions options_;
  httplib::Server http_;
  std::atomic<ModelService*> model_{nullptr};
  std::atomic<bool> draining_{false};
  std::atomic<bool> serving_{false};  // from bind() until listen() returns
  InflightRequests inflight_;
  ResponseCounter responses_;
  int64_t started_at_;  // Unix seconds: the served model's `created`
  socket_t listening_socket_ = INVALID_SOCKET;
  std::string key_identity_;  // of the API key, for cache scopes: empty without one
};

}  // namespace m1::server
