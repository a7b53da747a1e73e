#include "server/rpc_metrics_interceptor.h"

#include <google/protobuf/descriptor.h>
#include <grpcpp/server_context.h>

#include <chrono>
#include <set>

#include "server/grpc_status.h"
#include "spdlog/spdlog.h"

namespace lorad::server {
namespace {

using grpc::experimental::InterceptionHookPoints;

class RpcMetricsInterceptor : public grpc::experimental::Interceptor {
 public:
  RpcMetricsInterceptor(std::string method, grpc::ServerContextBase* context,
                        CounterFamily& requests, HistogramFamily& duration)
      : method_(std::move(method)),
        context_(context),
        requests_(requests),
        duration_(duration),
        start_(std::chrono::steady_clock::now()) {}

  // A deferred call whose end never came (no POST_RECV_CLOSE): counted as sent, without the
  // context (being destroyed with the call by now).
  ~RpcMetricsInterceptor() override {
    if (deferred_) Count(unreadable_ ? grpc::StatusCode::INVALID_ARGUMENT : sent_code_);
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE) &&
        methods->GetRecvMessage() != nullptr) {
      received_ = true;
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
      sent_code_ = methods->GetSendStatus().error_code();
      // gRPC's callback server answers a request it could not decode with a bare UNIMPLEMENTED
      // (grpc#30454), which reads as a client built against the wrong API. For lorad's methods
      // (an unknown one stays UNIMPLEMENTED) the client is told what it sent. A call that ended
      // before its request arrived is answered the same way, but its client has stopped
      // listening (and the count says what it saw: CodeTheClientSees).
      if (sent_code_ == grpc::StatusCode::UNIMPLEMENTED && !received_ && method_ != "unknown") {
        unreadable_ = true;
        methods->ModifySendStatus(
            grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, UnreadableRequestMessage(method_)));
      }
      if (context_ != nullptr && spdlog::should_log(spdlog::level::debug)) {
        peer_ = context_->peer();
      }
      // Without a request, UNIMPLEMENTED may be a call that ended before its request arrived:
      // the context knows once the call is over (POST_RECV_CLOSE), unless it does already.
      const bool maybe_ended = sent_code_ == grpc::StatusCode::UNIMPLEMENTED && !received_;
      if (!maybe_ended || closed_ || context_ == nullptr || context_->IsCancelled()) {
        Count(CodeTheClientSees(sent_code_));
      } else {
        deferred_ = true;
      }
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_CLOSE)) {
      closed_ = true;
      if (deferred_) {
        deferred_ = false;
        Count(CodeTheClientSees(sent_code_));
      }
    }
    methods->Proceed();
  }

 private:
  void Count(grpc::StatusCode code) {
    requests_.Inc({method_, StatusCodeName(code)});
    duration_.Observe({method_}, seconds_);
    // --log-level debug: a line a call, as the counters see it.
    spdlog::debug("{} {} {:.3f} s {}", method_, StatusCodeName(code), seconds_, peer_);
  }

  // A call cancelled, or past its deadline, before its request arrived is answered UNIMPLEMENTED
  // by gRPC's callback server (no request to decode, as for an unparseable one: grpc#30454),
  // while its client sees CANCELLED or DEADLINE_EXCEEDED. The context says which once the call
  // is over (measured: mostly not yet when the status is sent). Counting what the client saw
  // keeps UNIMPLEMENTED meaning a client built against the wrong API. Called while the call
  // lives (its context too).
  grpc::StatusCode CodeTheClientSees(grpc::StatusCode sent) const {
    if (sent != grpc::StatusCode::UNIMPLEMENTED || received_) return sent;
    if (context_ != nullptr && context_->IsCancelled()) {
      // With CancelledCallStatus's slack: gRPC's deadline timer may fire a little early.
      return CancelledCallStatus(CallDeadline(*context_)).error_code();
    }
    return unreadable_ ? grpc::StatusCode::INVALID_ARGUMENT : sent;
  }

  std::string method_;
  grpc::ServerContextBase* context_;
  bool received_ = false;    // a request message arrived and was decoded
  bool deferred_ = false;    // UNIMPLEMENTED without a request: counted at POST_RECV_CLOSE
  bool closed_ = false;      // POST_RECV_CLOSE came
  bool unreadable_ = false;  // its UNIMPLEMENTED was sent as INVALID_ARGUMENT
  double seconds_ = 0;       // arrival to status
  grpc::StatusCode sent_code_ = grpc::StatusCode::OK;
  std::string peer_;  // the client's address, for the debug log
  CounterFamily& requests_;
  HistogramFamily& duration_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace

std::string UnreadableRequestMessage(const std::string& method) {
  const auto slash = method.find('/');
  const google::protobuf::MethodDescriptor* described =
      slash == std::string::npos
          ? nullptr
          : google::protobuf::DescriptorPool::generated_pool()->FindMethodByName(
                method.substr(0, slash) + "." + method.substr(slash + 1));
  const std::string type =
      described != nullptr ? described->input_type()->full_name() : std::string("request");
  return "the request could not be read as a " + type +
         ": a text field holds bytes that are not UTF-8 (protobuf's string fields must be), or "
         "the message is not of that type (a client built from another version of lorad's "
         ".proto files?)";
}

RpcMetricsInterceptorFactory::RpcMetricsInterceptorFactory(MetricsRegistry& registry)
    : requests_(registry.AddCounter("lorad_rpc_requests_total",
                                    "gRPC calls finished, by method and status code",
                                    {"method", "code"})),
      duration_(registry.AddHistogram("lorad_rpc_duration_seconds",
                                      "gRPC call duration from arrival to status, in seconds",
                                      {"method"}, LatencyBucketsSeconds())) {}

grpc::experimental::Interceptor* RpcMetricsInterceptorFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  return new RpcMetricsInterceptor(MethodLabel(info->method()), info->server_context(), requests_,
                                   duration_);
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
