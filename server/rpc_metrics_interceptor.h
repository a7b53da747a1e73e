// RpcMetricsInterceptorFactory: counts every gRPC call by method and status code and records its
// latency, for lorad_rpc_requests_total and lorad_rpc_duration_seconds.
#pragma once

#include <grpcpp/support/server_interceptor.h>

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
// grpc::StatusCode -> "OK", "INVALID_ARGUMENT", ...
std::string StatusCodeName(int code);

}  // namespace lorad::server
