// HttpServer: the operator-facing HTTP endpoint. GET /metrics renders the metrics registry in the
// Prometheus text format; GET /healthz answers 200 "serving" or 503 with the lifecycle state.
// Runs on its own thread; Stop() may be called from any thread.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "server/metrics_registry.h"
#include "server/serving_state.h"

namespace httplib {
class Server;
}

namespace lorad::server {

class HttpServer {
 public:
  HttpServer(const MetricsRegistry& metrics, const ServingState& state);
  ~HttpServer();

  // Binds host:port now (so a taken port is an error at start-up) and serves in the background.
  absl::Status Start(const std::string& address);
  void Stop();
  int port() const { return port_; }

 private:
  const MetricsRegistry& metrics_;
  const ServingState& state_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  std::atomic<bool> listen_returned_{false};  // the serving loop ended (or never started)
  int port_ = 0;
};

}  // namespace lorad::server
