#include "client_connection.h"

#include <dirent.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>

#include <cstdlib>
#include <string>

namespace m1::server {
namespace {

struct Endpoint {
  std::string host;
  int port = -1;
};

// An address as httplib writes Request::remote_addr and local_addr: getnameinfo, numeric host.
bool numeric(const sockaddr_storage& address, socklen_t length, Endpoint& out) {
  if (address.ss_family != AF_INET && address.ss_family != AF_INET6) return false;
  char host[NI_MAXHOST], service[NI_MAXSERV];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&address), length, host, sizeof host, service, sizeof service,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return false;
  out.host = host;
  out.port = std::atoi(service);
  return true;
}

bool endpoint_of(int socket, bool peer, Endpoint& out) {
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  const int rc = peer ? getpeername(socket, reinterpret_cast<sockaddr*>(&address), &length)
                      : getsockname(socket, reinterpret_cast<sockaddr*>(&address), &length);
  return rc == 0 && numeric(address, length, out);
}

}  // namespace

int find_connection_socket(const std::string& local_addr, int local_port, const std::string& remote_addr,
                           int remote_port) {
  DIR* fds = opendir("/proc/self/fd");
  if (fds == nullptr) return -1;
  int found = -1;
  while (const dirent* entry = readdir(fds)) {
    char* end = nullptr;
    const long fd = std::strtol(entry->d_name, &end, 10);
    if (end == entry->d_name || *end != '\0' || fd == dirfd(fds)) continue;
    Endpoint local, peer;
    if (!endpoint_of(int(fd), false, local) || local.port != local_port || local.host != local_addr) continue;
    if (!endpoint_of(int(fd), true, peer) || peer.port != remote_port || peer.host != remote_addr) continue;
    found = int(fd);
    break;
  }
  closedir(fds);
  return found;
}

// httplib closes the socket only after the handler returns, so the descriptor found stays this
// request's for as long as the handler can ask.
bool ClientConnection::left() {
  if (!looked_) {
    looked_ = true;
    socket_ = find_connection_socket(request_.local_addr, request_.local_port, request_.remote_addr,
                                     request_.remote_port);
  }
  if (socket_ < 0) return false;
  pollfd p{socket_, POLLIN | POLLRDHUP, 0};
  if (poll(&p, 1, 0) <= 0) return false;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

}  // namespace m1::server
