// HttpServer: the operator-facing HTTP endpoint. GET /metrics renders the metrics registry in the
// Prometheus text format; GET /healthz answers 200 "serving" or 503 with the lifecycle state.
//
// A small HTTP/1.x server of its own, one thread polling every connection, because what it must
// withstand is bounded here and was not in the library it replaced (cpp-httplib 0.11, which
// took any number of header lines, 2 GB from one connection, and gave each connection a thread
// for as long as it trickled bytes): a request's head is at most kMaxRequestBytes, a connection
// lives at most kConnectionSeconds, and at most kMaxConnections are open (a new one closes the
// oldest, so a flood of slow clients cannot keep a health check out). Every answer closes its
// connection. Stop() may be called from any thread.
#pragma once

#include <netdb.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/metrics_registry.h"
#include "server/serving_state.h"

namespace lorad::server {

// Listening TCP sockets on `address` (host:port) as lorad listens: one on every address the host
// name resolves to, as gRPC listens (`localhost` is ::1 and 127.0.0.1 on most hosts: the first
// alone left scrapers of 127.0.0.1 refused, and the port there free for another program);
// SO_REUSEADDR, never SO_REUSEPORT (a second daemon must not share the port). An address this
// host cannot have (IPv6 turned off) is skipped; any other failure (port in use) fails it all.
// UNAVAILABLE names `key` and the `flag` that chooses another. The daemon also opens and closes
// them on the gRPC address before the model loads, so a port in use is found in a second, not
// after minutes of loading.
absl::StatusOr<std::vector<int>> ListenOn(const std::string& address, const std::string& key,
                                          const std::string& flag);
// ListenOn after name resolution: the addresses in `found` (a getaddrinfo list; an address listed
// twice is listened on once), `address`, `key` and `flag` for the messages.
absl::StatusOr<std::vector<int>> ListenOnResolved(const addrinfo* found, const std::string& address,
                                                  const std::string& key, const std::string& flag);

class HttpServer {
 public:
  static constexpr size_t kMaxRequestBytes = 16 << 10;
  static constexpr int kConnectionSeconds = 10;
  static constexpr size_t kMaxConnections = 256;
  // How long accepting pauses when the process (or system) is out of file descriptors.
  static constexpr std::chrono::milliseconds kAcceptPause{100};

  HttpServer(const MetricsRegistry& metrics, const ServingState& state);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds host:port now (so a taken port is an error at start-up) and serves in the background.
  absl::Status Start(const std::string& address);
  void Stop();
  int port() const { return port_; }

 private:
  struct Connection;
  void Serve();
  // The whole response to a request head (status line, headers, body).
  std::string Respond(const std::string& head) const;

  const MetricsRegistry& metrics_;
  const ServingState& state_;
  std::vector<int> listen_fds_;
  int wake_fds_[2] = {-1, -1};  // a pipe: Stop() writes to end the loop
  std::thread thread_;
  int port_ = 0;
};

}  // namespace lorad::server
