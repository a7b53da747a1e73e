// HealthService: the standard gRPC health checking protocol (grpc.health.v1.Health, Check and
// Watch), for load balancers, Kubernetes' gRPC probes and gRPC's client-side health checking.
//
// lorad's own rather than gRPC's built-in service (grpc::EnableDefaultHealthCheckService): that
// one (1.51) never ends a Watch stream, so every open watch held each stop of the daemon for the
// whole shutdown grace (server.shutdown_grace_seconds, up to an hour). Here Shutdown tells each
// watcher NOT_SERVING and then ends its stream (UNAVAILABLE, "lorad is stopping").
//
// Names answered: "" (the server as a whole) and the services given at construction; each is
// SERVING or NOT_SERVING, all together (lorad serves all of its services or none). Check of
// another name is NOT_FOUND; Watch of one streams SERVICE_UNKNOWN, as the protocol says. No
// authorization: probes carry no token.
#pragma once

#include <grpcpp/grpcpp.h>

#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"

namespace lorad::server {

class HealthService final : public grpc::health::v1::Health::CallbackService {
 public:
  // Every name starts NOT_SERVING.
  explicit HealthService(std::vector<std::string> services);

  // Every name SERVING (or NOT_SERVING), sent to the watchers whose status changes. After
  // Shutdown it changes nothing.
  void SetServing(bool serving);
  // Every name NOT_SERVING for good; each watcher is sent that (unless it already has been) and
  // its stream then ends. A Watch that starts later gets NOT_SERVING and ends at once.
  void Shutdown();

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* context,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* context,
      const grpc::health::v1::HealthCheckRequest* request) override;

 private:
  class Watcher;
  using Status = grpc::health::v1::HealthCheckResponse::ServingStatus;

  Status StatusOfLocked(const std::string& service) const;
  // Tells every watcher its status now; `last`: and ends their streams.
  void NotifyLocked(bool last);

  std::mutex mu_;
  const std::set<std::string> services_;
  bool serving_ = false;
  bool shut_down_ = false;
  std::set<Watcher*> watchers_;  // each removes itself when its call is done
};

}  // namespace lorad::server
