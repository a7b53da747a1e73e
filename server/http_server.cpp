#include "server/http_server.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <list>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/server_config.h"
#include "spdlog/spdlog.h"

namespace lorad::server {
namespace {

using Clock = std::chrono::steady_clock;

std::string Response(int status, const char* reason, const std::string& content_type,
                     const std::string& body, bool with_body, const char* extra_headers = "") {
  std::string r = absl::StrCat("HTTP/1.1 ", status, " ", reason, "\r\nContent-Type: ", content_type,
                               "\r\nContent-Length: ", body.size(), "\r\n", extra_headers,
                               "Connection: close\r\n\r\n");
  if (with_body) r += body;
  return r;
}

// Where a request's head ends (after its blank line), or npos while it is incomplete. Bare LF
// line ends are taken too, as HTTP/1.1 servers do.
size_t HeadEnd(const std::string& in) {
  const size_t crlf = in.find("\r\n\r\n");
  const size_t lf = in.find("\n\n");
  if (crlf == std::string::npos && lf == std::string::npos) return std::string::npos;
  return std::min(crlf == std::string::npos ? std::string::npos : crlf + 4,
                  lf == std::string::npos ? std::string::npos : lf + 2);
}

}  // namespace

struct HttpServer::Connection {
  int fd = -1;
  Clock::time_point opened;
  std::string in;   // the request head so far
  std::string out;  // the response; bytes from `sent` on are still to write
  size_t sent = 0;
  bool responding = false;
  bool done = false;
};

HttpServer::HttpServer(const MetricsRegistry& metrics, const ServingState& state)
    : metrics_(metrics), state_(state) {}

HttpServer::~HttpServer() { Stop(); }

namespace {

// Why, in the words that say what to do: the port taken, a privileged port, a name or address
// this host does not have.
absl::Status CannotListen(const std::string& address, const std::string& key,
                          const std::string& flag, const std::string& why) {
  return absl::UnavailableError(absl::StrCat(key, ": cannot listen on ", address, " (", why,
                                             "); choose another with ", flag));
}

std::string ListenFailure(int err) {
  switch (err) {
    case EADDRINUSE:
      return "port in use";
    case EACCES:
      return "permission denied: a port below 1024 needs privileges, or a security policy "
             "refuses it";
    case EADDRNOTAVAIL:
      return "not an address of this host";
    default:
      return std::strerror(err);
  }
}

}  // namespace

absl::StatusOr<std::vector<int>> ListenOnResolved(const addrinfo* found, const std::string& address,
                                                  const std::string& key, const std::string& flag) {
  std::vector<int> fds;
  std::vector<std::string> bound;  // the addresses listened on, as bytes
  // An IPv6 socket takes its own address only where an IPv4 one is to bind beside it (localhost:
  // ::1 and 127.0.0.1); alone ([::]), it keeps the system's dual stack and takes IPv4 too.
  bool has_ipv4 = false;
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) has_ipv4 |= a->ai_family == AF_INET;
  int skipped = 0;  // why the last address this host cannot have was skipped
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
    const std::string bytes(reinterpret_cast<const char*>(a->ai_addr), a->ai_addrlen);
    if (std::find(bound.begin(), bound.end(), bytes) != bound.end()) continue;
    int err = 0;
    const int fd =
        socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      err = errno;
    } else {
      // SO_REUSEADDR (a quick restart while the port is in TIME_WAIT), never SO_REUSEPORT: with
      // it a second daemon would bind the same port and the kernel spread scrapes over both.
      int yes = 1;
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
      if (a->ai_family == AF_INET6 && has_ipv4) {
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &yes, sizeof(yes));
      }
      if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 64) != 0) {
        err = errno;
        close(fd);
      }
    }
    if (err == 0) {
      fds.push_back(fd);
      bound.push_back(bytes);
      continue;
    }
    if (err == EAFNOSUPPORT || err == EADDRNOTAVAIL) {
      skipped = err;  // e.g. ::1 where IPv6 is turned off: the other addresses serve
      continue;
    }
    for (const int open_fd : fds) close(open_fd);
    return CannotListen(address, key, flag, ListenFailure(err));
  }
  if (fds.empty()) {
    return CannotListen(address, key, flag,
                        skipped != 0 ? ListenFailure(skipped) : "the name has no address");
  }
  return fds;
}

absl::StatusOr<std::vector<int>> ListenOn(const std::string& address, const std::string& key,
                                          const std::string& flag) {
  auto host_port = SplitHostPort(address);
  if (!host_port.ok()) {
    return CannotListen(address, key, flag, std::string(host_port.status().message()));
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  const std::string& host = host_port->first;
  if (const int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(),
                                 std::to_string(host_port->second).c_str(), &hints, &found);
      rc != 0) {
    return CannotListen(address, key, flag, absl::StrCat("address not found: ", gai_strerror(rc)));
  }
  auto fds = ListenOnResolved(found, address, key, flag);
  freeaddrinfo(found);
  return fds;
}

absl::Status HttpServer::Start(const std::string& address) {
  auto host_port = SplitHostPort(address);
  if (!host_port.ok()) return host_port.status();
  auto listening = ListenOn(address, "server.http_address", "--http-address");
  if (!listening.ok()) return listening.status();
  if (pipe2(wake_fds_, O_NONBLOCK | O_CLOEXEC) != 0) {
    for (const int fd : *listening) close(fd);
    return absl::InternalError("cannot create the HTTP server's wake-up pipe");
  }
  listen_fds_ = *std::move(listening);
  port_ = host_port->second;
  thread_ = std::thread([this] { Serve(); });
  return absl::OkStatus();
}

void HttpServer::Stop() {
  if (thread_.joinable()) {
    const char wake = 1;
    (void)!write(wake_fds_[1], &wake, 1);
    thread_.join();
  }
  for (const int fd : listen_fds_) close(fd);
  listen_fds_.clear();
  for (int* fd : {&wake_fds_[0], &wake_fds_[1]}) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
  }
}

std::string HttpServer::Respond(const std::string& head) const {
  // The request line: METHOD SP TARGET SP VERSION; the headers are not needed.
  const std::string line = head.substr(0, head.find_first_of("\r\n"));
  const size_t first = line.find(' ');
  const size_t second = first == std::string::npos ? first : line.find(' ', first + 1);
  if (second == std::string::npos || line.compare(second + 1, 5, "HTTP/") != 0) {
    return Response(400, "Bad Request", "text/plain", "bad request line\n", true);
  }
  const std::string method = line.substr(0, first);
  const std::string target = line.substr(first + 1, second - first - 1);
  const std::string path = target.substr(0, target.find('?'));
  const bool head_only = method == "HEAD";
  if (method != "GET" && !head_only) {
    return Response(405, "Method Not Allowed", "text/plain", "GET or HEAD\n", true,
                    "Allow: GET, HEAD\r\n");
  }
  if (path == "/metrics") {
    return Response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", metrics_.Render(),
                    !head_only);
  }
  if (path == "/healthz") {
    const bool serving = state_.Serving();
    return Response(serving ? 200 : 503, serving ? "OK" : "Service Unavailable", "text/plain",
                    state_.Name() + "\n", !head_only);
  }
  return Response(404, "Not Found", "text/plain", "not found: try /metrics or /healthz\n",
                  !head_only);
}

void HttpServer::Serve() {
  std::list<Connection> connections;  // oldest first
  std::vector<pollfd> fds;
  std::vector<Connection*> owners;
  char buffer[4096];
  // When accept4 finds the process out of file descriptors, the connection stays in the listen
  // queue and the listening socket stays readable: polling it at once again would spin a core
  // for as long as the descriptors are short. So accepting pauses until then.
  Clock::time_point accept_resumes{};
  bool short_of_descriptors = false;  // logged once per shortage
  while (true) {
    const Clock::time_point now = Clock::now();
    const bool accepting = now >= accept_resumes;
    fds.assign({{wake_fds_[0], POLLIN, 0}});
    for (const int fd : listen_fds_) {
      fds.push_back({fd, static_cast<short>(accepting ? POLLIN : 0), 0});
    }
    const size_t first_connection = fds.size();
    owners.clear();
    int timeout_ms = -1;  // until the oldest connection's time is up, or accepting resumes
    if (!accepting) {
      timeout_ms = static_cast<int>(
          std::chrono::duration_cast<std::chrono::milliseconds>(accept_resumes - now).count() + 1);
    }
    for (Connection& c : connections) {
      fds.push_back({c.fd, static_cast<short>(c.responding ? POLLOUT : POLLIN), 0});
      owners.push_back(&c);
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          c.opened + std::chrono::seconds(kConnectionSeconds) - now);
      const int ms = static_cast<int>(std::max<int64_t>(0, left.count()) + 1);
      timeout_ms = timeout_ms < 0 ? ms : std::min(timeout_ms, ms);
    }
    if (poll(fds.data(), fds.size(), timeout_ms) < 0 && errno != EINTR) continue;
    if (fds[0].revents != 0) break;  // Stop()
    for (size_t i = first_connection; i < fds.size(); ++i) {
      Connection& c = *owners[i - first_connection];
      const short events = fds[i].revents;
      if (!c.responding && (events & (POLLIN | POLLHUP | POLLERR))) {
        const ssize_t n = recv(c.fd, buffer, sizeof(buffer), 0);
        if (n <= 0) {
          c.done = n == 0 || (errno != EAGAIN && errno != EINTR);
          continue;
        }
        c.in.append(buffer, static_cast<size_t>(n));
        const size_t end = HeadEnd(c.in);
        if (end != std::string::npos && end <= kMaxRequestBytes) {
          c.out = Respond(c.in.substr(0, end));
          c.responding = true;
        } else if (c.in.size() > kMaxRequestBytes) {
          c.out = Response(431, "Request Header Fields Too Large", "text/plain",
                           absl::StrCat("the request head is over ", kMaxRequestBytes, " bytes\n"),
                           true);
          c.responding = true;
        }
      } else if (c.responding && (events & (POLLOUT | POLLHUP | POLLERR))) {
        const ssize_t n = send(c.fd, c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN && errno != EINTR) c.done = true;
        if (n > 0) c.sent += static_cast<size_t>(n);
        if (c.sent == c.out.size()) c.done = true;
      }
    }
    const Clock::time_point after = Clock::now();
    for (auto it = connections.begin(); it != connections.end();) {
      if (it->done || after - it->opened >= std::chrono::seconds(kConnectionSeconds)) {
        shutdown(it->fd, SHUT_WR);
        close(it->fd);
        it = connections.erase(it);
      } else {
        ++it;
      }
    }
    for (size_t l = 1; l < first_connection; ++l) {
      if (!(fds[l].revents & POLLIN)) continue;
      while (true) {
        const int fd = accept4(fds[l].fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
          if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            accept_resumes = Clock::now() + kAcceptPause;
            if (!short_of_descriptors) {
              spdlog::warn(
                  "HTTP server: cannot accept a connection ({}); trying again every {} ms. Raise "
                  "the open-files limit (ulimit -n, LimitNOFILE= in systemd) if this persists",
                  errno == ENFILE   ? "the system is out of file descriptors"
                  : errno == EMFILE ? "lorad has as many files open as its limit allows"
                                    : "out of memory",
                  kAcceptPause.count());
            }
            short_of_descriptors = true;
          }
          break;
        }
        short_of_descriptors = false;
        if (connections.size() >= kMaxConnections) {  // the oldest gives way
          close(connections.front().fd);
          connections.pop_front();
        }
        Connection c;
        c.fd = fd;
        c.opened = Clock::now();
        connections.push_back(std::move(c));
      }
    }
  }
  for (Connection& c : connections) close(c.fd);
}

}  // namespace lorad::server
