#include "server/rpc_metrics_interceptor.h"

#include <google/protobuf/descriptor.h>

#include <chrono>
#include <set>

namespace lorad::server {
namespace {

using grpc::experimental::InterceptionHookPoints;

class RpcMetricsInterceptor : public grpc::experimental::Interceptor {
 public:
  RpcMetricsInterceptor(std::string method, CounterFamily& requests, HistogramFamily& duration)
      : method_(std::move(method)),
        requests_(requests),
        duration_(duration),
        start_(std::chrono::steady_clock::now()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
      requests_.Inc({method_, StatusCodeName(status.error_code())});
      duration_.Observe({method_}, seconds);
    }
    methods->Proceed();
  }

 private:
  std::string method_;
  CounterFamily& requests_;
  HistogramFamily& duration_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace

RpcMetricsInterceptorFactory::RpcMetricsInterceptorFactory(MetricsRegistry& registry)
    : requests_(registry.AddCounter("lorad_rpc_requests_total",
                                    "gRPC calls finished, by method and status code",
                                    {"method", "code"})),
      duration_(registry.AddHistogram("lorad_rpc_duration_seconds",
                                      "gRPC call duration from arrival to status, in seconds",
                                      {"method"}, LatencyBucketsSeconds())) {}

grpc::experimental::Interceptor* RpcMetricsInterceptorFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  return new RpcMetricsInterceptor(MethodLabel(info->method()), requests_, duration_);
}

std::string MethodLabel(const char* full_method) {
  std::string m = full_method == nullptr ? "" : full_method;
  if (!m.empty() && m.front() == '/') m.erase(0, 1);
  // Only methods lorad serves get their own label: a caller naming made-up methods (no token is
  // needed to be refused) would otherwise add series to /metrics without end.
  static const std::set<std::string> kLibraryMethods = {
      "grpc.health.v1.Health/Check", "grpc.health.v1.Health/Watch", "grpc.health.v1.Health/List",
      "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
      "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"};
  if (kLibraryMethods.count(m) > 0) return m;
  const auto slash = m.find('/');
  if (m.rfind("lorad.v1.", 0) == 0 && slash != std::string::npos &&
      google::protobuf::DescriptorPool::generated_pool()->FindMethodByName(
          m.substr(0, slash) + "." + m.substr(slash + 1)) != nullptr) {
    return m;
  }
  return "unknown";
}

std::string StatusCodeName(int code) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  if (code >= 0 && code < static_cast<int>(sizeof(kNames) / sizeof(kNames[0]))) {
    return kNames[code];
  }
  return "CODE_" + std::to_string(code);
}

}  // namespace lorad::server
