#pragma once
// Whether the client of a request is still connected. httplib 0.11 gives a handler no socket and
// no word of a client that left, so the socket is found by the request's two addresses (a TCP
// connection's four-tuple is unique among live ones) and polled for a hang-up.

#include <httplib.h>

namespace m1::server {

class ClientConnection {
 public:
  // Nothing is looked up until the first call to left().
  explicit ClientConnection(const httplib::Request& request) : request_(request) {}

  // True once the client has closed or reset its end. Bytes it sent after the request (a pipelined
  // next request) do not count; a client that only shut down its sending side counts as gone, as
  // HTTP/1.1 clients do not half-close. False while the socket cannot be found.
  bool left();

 private:
  const httplib::Request& request_;
  bool looked_ = false;
  int socket_ = -1;
};

// The open socket of this process whose local and peer addresses are the given ones, in
// httplib's numeric form; -1 if none is.
int find_connection_socket(const std::string& local_addr, int local_port, const std::string& remote_addr,
                           int remote_port);

}  // namespace m1::server
