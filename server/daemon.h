// Daemon: the lorad process. Owns the gRPC server, the HTTP endpoint, the metrics registry and
// (from the engine issues on) the engine; main.cpp only parses flags and drives its lifecycle.
//
// Thread rules: Start() and Shutdown() are called from the main thread; the gRPC and HTTP
// threads only read the ServingState and the metrics.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "engine/infer/generation_defaults.h"
#include "engine/runtime/engine.h"
#include "server/blocking_calls.h"
#include "server/health_service.h"
#include "server/http_server.h"
#include "server/job_event_hub.h"
#include "server/job_runner.h"
#include "server/job_store.h"
#include "server/metrics_registry.h"
#include "server/server_config.h"
#include "server/serving_state.h"
#include "server/tls_files.h"
#include "server/token_authenticator.h"

namespace grpc {
class Server;
class Service;
}  // namespace grpc

namespace lorad::server {

class Daemon {
 public:
  explicit Daemon(ServerConfig config);
  ~Daemon();

  // Checks the model folder, prepares the data folder, starts HTTP and gRPC. A failure leaves
  // nothing listening. Model and config problems are INVALID_ARGUMENT / NOT_FOUND (exit code 2).
  absl::Status Start();
  // Reports NOT_SERVING, lets in-flight RPCs finish within the grace period, then stops.
  void Shutdown();
  // A second stop signal ends the process without the clean shutdown: the job database stops
  // saying this daemon runs jobs, so the next start does not count the stop as a death of the
  // running jobs (they resume from their last checkpoint). Waits at most `budget`; an error when
  // the database did not take it. Thread-safe; after Start.
  absl::Status RecordForcedStop(std::chrono::milliseconds budget);

  int grpc_port() const { return grpc_port_; }
  const MetricsRegistry& metrics() const { return metrics_; }

 private:
  absl::Status StartGrpc();
  // Publishes again the adapters that were served at the last stop, with the same versions, read
  // on a few threads (daemon_recorded_adapters.cpp).
  // Refused (the start stops) when the records cannot be read: the store would number new
  // versions from 1 again, and the records would keep the older, higher ones.
  absl::Status ServeRecordedAdapters();
  // A recorded adapter's folder, resolved, if it may be served again; else why not.
  absl::StatusOr<std::string> RecordedAdapterFolder(const ServedAdapter& a) const;
  // Takes <data_dir>/lorad.lock for the life of the process: one daemon per data folder.
  absl::Status LockDataDir();
  // <data_dir>/jobs: each job's folder (checkpoints, its adapter).
  std::string JobsDir() const;
  // When storage.data_dir (or the dataset or adapter root) is not where the job database saw it at
  // the last start (the folder was moved or mounted elsewhere), the dataset and adapter paths it
  // holds are moved along; then records where the folders are now.
  absl::Status FollowMovedFolders();
  // INVALID_ARGUMENT naming the file and line when a submitted job's data would fail at its start.
  absl::Status CheckJobData(const lorad::v1::JobSpec& spec, const std::atomic<bool>* abandon) const;
  absl::Status OpenJobStore();
  // `key` with where the config set it, for errors about its value: "lorad.yaml:12: model.path"
  // (the key alone when it has its default).
  std::string KeyAt(const std::string& key) const;
  absl::Status StartEngine();
  // Whether the job an adapter's source names ("job:<id>") took the model's own chat template.
  bool TookModelsOwnTemplate(const std::string& source);
  absl::Status LoadTokens();
  void RegisterEngineMetrics();
  void RegisterProcessMetrics();

  ServerConfig config_;
  ServingState state_;
  MetricsRegistry metrics_;
  HttpServer http_;
  std::unique_ptr<JobStore> jobs_;
  JobEventHub job_events_;
  std::string dataset_root_;
  std::string adapter_root_;
  TokenAuthenticator auth_;
  std::unique_ptr<engine::Engine> engine_;
  // Sampling for requests' unset fields (model.generation_config).
  engine::GenerationDefaults generation_defaults_;
  std::unique_ptr<JobRunner> job_runner_;
  // Folders of deleted jobs a crash left (FinishInterruptedDeletions), removed once serving.
  std::vector<std::string> deleted_job_folders_;
  std::unique_ptr<BlockingCalls> blocking_calls_;   // SubmitJob's dataset checks
  std::unique_ptr<BlockingCalls> file_free_calls_;  // ... of jobs on inline examples only
  // LoadAdapter's file reads and DeleteJob's removals: an operator's hot swap does not wait
  // behind users' submissions of large datasets.
  std::unique_ptr<BlockingCalls> admin_calls_;
  std::vector<std::unique_ptr<grpc::Service>> services_;
  std::unique_ptr<HealthService> health_;  // grpc.health.v1.Health
  // The TLS pair gRPC serves, renewed from its files (declared first: gRPC reads it until the
  // server is gone).
  std::unique_ptr<ServedTlsPair> tls_;
  std::unique_ptr<grpc::Server> grpc_server_;
  int grpc_port_ = 0;
  // The job database says this daemon runs jobs (JobStore::MarkDaemonRunning) until Shutdown.
  std::atomic<bool> marked_running_{false};
  int data_dir_lock_ = -1;  // held (flock) while the daemon lives; the kernel drops it on exit
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
};

}  // namespace lorad::server
