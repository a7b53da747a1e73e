// RpcMetricsInterceptorFactory: counts every gRPC call by method and status code and records its
// latency, for lorad_rpc_requests_total and lorad_rpc_duration_seconds. It also sees every
// call's status go out, and so tells a client whose request gRPC could not decode what it sent
// (gRPC's own answer is a bare UNIMPLEMENTED).
#pragma once

#include <grpcpp/support/server_interceptor.h>

#include <string>

#include "server/metrics_registry.h"

namespace lorad::server {

class RpcMetricsInterceptorFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  // Registers the two metric families in `registry`, which must outlive the factory.
  explicit RpcMetricsInterceptorFactory(MetricsRegistry& registry);

  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;

 private:
  CounterFamily& requests_;
  HistogramFamily& duration_;
};

// "/lorad.v1.TrainingService/SubmitJob" -> "lorad.v1.TrainingService/SubmitJob"; a method lorad
// does not serve (nor the health and reflection services) -> "unknown".
std::string MethodLabel(const char* full_method);
// The INVALID_ARGUMENT message for a request of `method` (a MethodLabel) that did not decode.
std::string UnreadableRequestMessage(const std::string& method);
// grpc::StatusCode -> "OK", "INVALID_ARGUMENT", ...
std::string StatusCodeName(int code);

}  // namespace lorad::server
