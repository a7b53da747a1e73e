#include "server/daemon.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "lorad/v1/adapters.grpc.pb.h"
#include "lorad/v1/inference.grpc.pb.h"
#include "lorad/v1/training.grpc.pb.h"
#include "server/rpc_metrics_interceptor.h"

namespace lorad::server {
namespace {

// The services the daemon exposes. Their handlers answer UNIMPLEMENTED until the training,
// inference and adapter issues land; health and reflection list them already.
constexpr const char* kServiceNames[] = {
    "lorad.v1.TrainingService",
    "lorad.v1.InferenceService",
    "lorad.v1.AdapterService",
};

}  // namespace

Daemon::Daemon(ServerConfig config) : config_(std::move(config)), http_(metrics_, state_) {}

Daemon::~Daemon() { Shutdown(); }

void Daemon::RegisterProcessMetrics() {
  metrics_
      .AddGauge("lorad_build_info", "lorad build and runtime facts; the value is always 1",
                {"version", "torch_version", "device", "cuda_kernels"})
      .Set(
          {
            LORAD_VERSION, device_.torch_version, device_.device,
#if defined(LORAD_WITH_CUDA)
                "on"
#else
                "off"
#endif
          },
          1);
  metrics_.AddGaugeCallback("lorad_process_uptime_seconds", "Seconds since lorad started", [this] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  });
  metrics_
      .AddGauge("lorad_model_info", "The served base model; the value is always 1",
                {"architecture", "layers", "hidden_size", "vocab_size"})
      .Set({model_config_.architecture, std::to_string(model_config_.num_hidden_layers),
            std::to_string(model_config_.hidden_size), std::to_string(model_config_.vocab_size)},
           1);
}

absl::Status Daemon::Start() {
  state_.Set(Lifecycle::kLoading);
  auto model = engine::ModelConfig::LoadFromFolder(config_.model.path);
  if (!model.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("model.path: ", model.status().message()));
  }
  model_config_ = *model;
  device_ = engine::DeviceInfo::Detect(config_.model.device);
  if (config_.model.device == "cuda" && device_.device == "cpu") {
    return absl::InvalidArgumentError(
        "model.device: 'cuda' was asked for but no CUDA device is visible; use 'auto' or 'cpu'");
  }
  spdlog::info("model {}: {}, {} layers, hidden {}, vocab {}; device {} ({}), torch {}",
               config_.model.path, model_config_.architecture, model_config_.num_hidden_layers,
               model_config_.hidden_size, model_config_.vocab_size, device_.device, device_.dtype,
               device_.torch_version);

  std::error_code ec;
  std::filesystem::create_directories(config_.storage.data_dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat("storage.data_dir: cannot create '",
                                                   config_.storage.data_dir, "': ", ec.message()));
  }

  RegisterProcessMetrics();
  if (auto s = http_.Start(config_.server.http_address); !s.ok()) return s;
  if (auto s = StartGrpc(); !s.ok()) {
    http_.Stop();
    return s;
  }
  state_.Set(Lifecycle::kServing);
  grpc_server_->GetHealthCheckService()->SetServingStatus(true);
  spdlog::info("serving gRPC on {} and HTTP (/metrics, /healthz) on {}",
               config_.server.grpc_address, config_.server.http_address);
  return absl::OkStatus();
}

absl::Status Daemon::StartGrpc() {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  services_.push_back(std::make_unique<lorad::v1::TrainingService::Service>());
  services_.push_back(std::make_unique<lorad::v1::InferenceService::Service>());
  services_.push_back(std::make_unique<lorad::v1::AdapterService::Service>());

  grpc::ServerBuilder builder;
  builder.AddListeningPort(config_.server.grpc_address, grpc::InsecureServerCredentials(),
                           &grpc_port_);
  // gRPC sets SO_REUSEPORT by default, which lets a second daemon silently share the port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(static_cast<int>(config_.server.max_request_bytes));
  for (auto& service : services_) builder.RegisterService(service.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<RpcMetricsInterceptorFactory>(metrics_));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));

  grpc_server_ = builder.BuildAndStart();
  if (!grpc_server_ || grpc_port_ == 0) {
    grpc_server_.reset();
    return absl::UnavailableError(
        absl::StrCat("server.grpc_address: cannot listen on ", config_.server.grpc_address,
                     " (port in use or address not local); choose another with --grpc-address"));
  }
  auto* health = grpc_server_->GetHealthCheckService();
  for (const char* name : kServiceNames) health->SetServingStatus(name, true);
  return absl::OkStatus();
}

void Daemon::Shutdown() {
  if (!grpc_server_ && state_.Get() != Lifecycle::kServing) {
    http_.Stop();
    return;
  }
  state_.Set(Lifecycle::kDraining);
  if (grpc_server_) {
    grpc_server_->GetHealthCheckService()->SetServingStatus(false);
    spdlog::info("draining: in-flight RPCs get {} s", config_.server.shutdown_grace_seconds);
    grpc_server_->Shutdown(std::chrono::system_clock::now() +
                           std::chrono::seconds(config_.server.shutdown_grace_seconds));
    grpc_server_->Wait();
    grpc_server_.reset();
  }
  http_.Stop();
  spdlog::info("stopped");
}

}  // namespace lorad::server
