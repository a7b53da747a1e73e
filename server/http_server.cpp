#include "server/http_server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "server/server_config.h"

namespace lorad::server {

HttpServer::HttpServer(const MetricsRegistry& metrics, const ServingState& state)
    : metrics_(metrics), state_(state), server_(std::make_unique<httplib::Server>()) {
  // httplib's default sets SO_REUSEPORT, with which a second daemon binds the same port and the
  // kernel spreads scrapes over both. SO_REUSEADDR alone still allows a quick restart (a port in
  // TIME_WAIT) but makes a port in use an error.
  server_->set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  // httplib serves each connection on a pool thread until it closes: its default pool (the
  // number of cores, at least 8) let 8 slow clients hold every thread and starve the health
  // checks. More threads, short keep-alives and a short read timeout raise that bar; the port
  // should still face trusted networks only (loopback by default), as httplib bounds neither a
  // request's header count nor its total time.
  server_->new_task_queue = [] { return new httplib::ThreadPool(64); };
  server_->set_read_timeout(5, 0);
  server_->set_keep_alive_max_count(20);
  server_->set_payload_max_length(1 << 20);
  server_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_.Render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  server_->Get("/healthz", [this](const httplib::Request&, httplib::Response& res) {
    res.status = state_.Serving() ? 200 : 503;
    res.set_content(state_.Name() + "\n", "text/plain");
  });
}

HttpServer::~HttpServer() { Stop(); }

absl::Status HttpServer::Start(const std::string& address) {
  auto host_port = SplitHostPort(address);
  if (!host_port.ok()) return host_port.status();
  if (!server_->bind_to_port(host_port->first.c_str(), host_port->second)) {
    return absl::UnavailableError(
        absl::StrCat("server.http_address: cannot listen on ", address,
                     " (port in use or address not local); choose another with --http-address"));
  }
  port_ = host_port->second;
  listen_returned_ = false;
  thread_ = std::thread([this] {
    server_->listen_after_bind();
    listen_returned_ = true;
  });
  // httplib's stop() does nothing until the loop has marked itself running, and the loop then
  // serves for ever: wait for it here, so that a Stop() right after Start() (a model that fails
  // to load) always ends it.
  while (!server_->is_running() && !listen_returned_) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return absl::OkStatus();
}

void HttpServer::Stop() {
  if (thread_.joinable()) {
    server_->stop();
    thread_.join();
  }
}

}  // namespace lorad::server
