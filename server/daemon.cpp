#include "server/daemon.h"

#include <fcntl.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "engine/lora/peft_config.h"
#include "engine/model/json_file.h"
#include "engine/runtime/device_info.h"
#include "engine/runtime/durable_file.h"
#include "lorad/v1/adapters.grpc.pb.h"
#include "lorad/v1/inference.grpc.pb.h"
#include "lorad/v1/training.grpc.pb.h"
#include "server/adapter_service.h"
#include "server/inference_service.h"
#include "server/job_spec_validator.h"
#include "server/path_policy.h"
#include "server/rpc_metrics_interceptor.h"
#include "server/training_service.h"

namespace lorad::server {
namespace {

// A data folder lorad cannot make or write: the operator's to fix (INVALID_ARGUMENT, exit code 2),
// unless the disk is full or failing (exit code 1, as for the job database: a supervisor that
// does not restart after a bad config still restarts after a full disk).
absl::Status StartupStorageError(int err, std::string message) {
  return err == ENOSPC || err == EDQUOT || err == EIO
             ? absl::FailedPreconditionError(std::move(message))
             : absl::InvalidArgumentError(std::move(message));
}

// The services the daemon exposes.
constexpr const char* kServiceNames[] = {"lorad.v1.TrainingService", "lorad.v1.InferenceService",
                                         "lorad.v1.AdapterService"};

// A job running at this many deaths of the daemon in a row, getting no further than its furthest
// step in between, is failed at the next start, not run again: it is likely what kills the daemon.
constexpr int64_t kMaxUncleanStops = 3;

}  // namespace

Daemon::Daemon(ServerConfig config) : config_(std::move(config)), http_(metrics_, state_) {}

Daemon::~Daemon() { Shutdown(); }

absl::Status Daemon::Start() {
  state_.Set(Lifecycle::kLoading);
  auto model = engine::ModelConfig::LoadFromFolder(config_.model.path);
  if (!model.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(KeyAt("model.path"), ": ", model.status().message()));
  }
  // The device is the engine's to pick (Engine::Start); this early read of config.json only turns
  // a wrong model path into one clear line before anything starts.
  spdlog::info("model {}: {}, {} layers, hidden {}, vocab {}", config_.model.path,
               model->architecture, model->num_hidden_layers, model->hidden_size,
               model->vocab_size);
  if (model->sliding_window > 0) {
    spdlog::warn(
        "the model attends within a sliding window of {} tokens; lorad attends to whole "
        "sequences, which is the same only while they fit in the window: its context (prompt "
        "and output, and training sequences) is capped at {} tokens",
        model->sliding_window, model->max_position_embeddings);
  }
  if (config_.model.generation_config == "auto") {
    // A file lorad cannot read must be corrected (transformers reads it for its EOS ids too);
    // a field lorad would use can be ignored instead.
    const std::string source =
        (std::filesystem::path(config_.model.path) / "generation_config.json").string();
    auto file = engine::ReadJsonObjectIfPresent(source);
    if (!file.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.generation_config: ", file.status().message(), "; correct the file"));
    }
    auto defaults = engine::GenerationDefaults::FromFile(*file, source);
    if (!defaults.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.generation_config: ", defaults.status().message(),
                       "; correct the file, or set model.generation_config: none to ignore it"));
    }
    generation_defaults_ = *std::move(defaults);
    if (generation_defaults_.from_file) {
      spdlog::info(
          "requests' unset sampling fields take the model's generation_config.json: {} "
          "(model.generation_config: none ignores it)",
          generation_defaults_.Describe());
    }
  }

  // Absolute from here on: the paths a job reports (adapter, checkpoints, merged model, eval
  // report) are then usable by a client whatever its working folder.
  for (std::string* path : {&config_.storage.data_dir, &config_.storage.dataset_root,
                            &config_.storage.adapter_root, &config_.model.path}) {
    std::error_code ec;
    if (path->empty()) continue;
    std::filesystem::path normal = std::filesystem::absolute(*path, ec).lexically_normal();
    // Without a trailing separator ("/data/" kept one): paths are matched as folder + "/".
    if (!normal.has_filename() && normal.has_relative_path()) normal = normal.parent_path();
    *path = normal.string();
  }
  // Checks that need no files first: a refusal leaves no data folder behind.
  if (auto s = LoadTokens(); !s.ok()) return s;
  if (auto s = engine::CheckDeviceAvailable(config_.model.device); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(KeyAt("model.device"), absl::StripPrefix(s.message(), "model.device")));
  }
  std::error_code ec;
  std::filesystem::create_directories(config_.storage.data_dir, ec);
  if (ec) {
    return StartupStorageError(ec.value(),
                               absl::StrCat(KeyAt("storage.data_dir"), ": cannot create '",
                                            config_.storage.data_dir, "': ", ec.message()));
  }
  spdlog::info("data folder {} (storage.data_dir)", config_.storage.data_dir);

  if (auto s = LockDataDir(); !s.ok()) return s;
  // Scratch folders of submissions a previous run did not finish (killed meanwhile).
  std::filesystem::remove_all(std::filesystem::path(config_.storage.data_dir) / "tmp", ec);
  if (auto s = OpenJobStore(); !s.ok()) return s;
  // HTTP first: /healthz says "loading" while the model loads.
  if (auto s = http_.Start(config_.server.http_address); !s.ok()) return s;
  if (auto probe = ListenOn(config_.server.grpc_address, "server.grpc_address", "--grpc-address");
      probe.ok()) {
    for (const int fd : *probe) close(fd);  // gRPC binds them once the services exist
  } else {
    http_.Stop();
    return probe.status();
  }
  if (!config_.server.tls_cert_file.empty()) {
    auto tls = ServedTlsPair::Start(config_.server.tls_cert_file, config_.server.tls_key_file,
                                    std::chrono::seconds(config_.server.tls_reload_seconds));
    if (!tls.ok()) {
      http_.Stop();
      return tls.status();
    }
    tls_ = *std::move(tls);
  }
  if (auto s = StartEngine(); !s.ok()) {
    http_.Stop();
    return s;
  }
  RegisterProcessMetrics();
  if (auto s = ServeRecordedAdapters(); !s.ok()) {
    engine_->Stop();
    http_.Stop();
    return s;
  }
  if (auto s = StartGrpc(); !s.ok()) {
    engine_->Stop();
    http_.Stop();
    return s;
  }
  // From here jobs may run: a death before Shutdown's end counts against them (OpenJobStore).
  const std::time_t now = std::time(nullptr);
  char started[32] = "";
  std::tm utc{};
  if (gmtime_r(&now, &utc)) std::strftime(started, sizeof(started), "%Y-%m-%d %H:%M:%S UTC", &utc);
  if (auto s = jobs_->MarkDaemonRunning(absl::StrCat("pid ", getpid(), ", started ", started));
      s.ok()) {
    marked_running_ = true;
  } else {
    spdlog::warn(
        "the job database did not record that lorad runs ({}): a job that crashes lorad would "
        "not be noticed at the next start",
        std::string(s.message()));
  }
  job_runner_->Start();
  job_runner_->RemoveInBackground(std::move(deleted_job_folders_));
  state_.Set(Lifecycle::kServing);
  health_->SetServing(true);
  spdlog::info("serving gRPC on {} and HTTP (/metrics, /healthz) on {}",
               config_.server.grpc_address, config_.server.http_address);
  return absl::OkStatus();
}

absl::Status Daemon::StartEngine() {
  namespace fs = std::filesystem;
  engine::EngineOptions options;
  options.model_folder = config_.model.path;
  options.device = config_.model.device;
  options.base_weights = config_.model.base_weights;
  options.chat_template = config_.model.chat_template;
  options.inference.kv_cache_bytes = config_.engine.kv_cache_bytes;
  options.inference.cuda_graphs = config_.engine.cuda_graphs;
  options.inference.on_warning = [](const std::string& warning) { spdlog::warn("{}", warning); };
  options.inference.logprobs_mode = config_.engine.logprobs_mode == "processed"
                                        ? engine::LogprobsMode::kProcessed
                                        : engine::LogprobsMode::kRaw;
  options.inference.scheduler.max_running =
      static_cast<int32_t>(config_.engine.max_running_requests);
  options.inference.scheduler.token_budget = config_.engine.max_batch_tokens;
  // A long prompt prefills in pieces of at most this many tokens, one piece per iteration; by
  // default as many as an iteration holds, so a lone 2,048-token prompt takes one iteration (each
  // piece reads every base weight once more).
  options.inference.scheduler.prefill_chunk =
      config_.engine.max_prefill_chunk > 0
          ? std::min(config_.engine.max_prefill_chunk, config_.engine.max_batch_tokens)
          : config_.engine.max_batch_tokens;
  options.inference.max_new_tokens_limit = static_cast<int32_t>(config_.limits.max_new_tokens);
  // The open streams are what limits.max_queued_requests counts (InferenceService); the
  // engine's own count is a backstop above it: a cancelled request leaves it only at the
  // engine's next step (after a training micro-batch, maybe seconds), and a stream opened on
  // the place it freed was refused by the engine meanwhile, with a message that did not say
  // what held the places.
  options.inference.max_queued = static_cast<int32_t>(2 * config_.limits.max_queued_requests);
  options.max_resident_adapters = static_cast<int32_t>(config_.engine.max_resident_adapters);
  options.train_share = config_.engine.train_share;
  options.max_training_jobs =
      static_cast<int32_t>(std::max<int64_t>(1, config_.training.max_running_jobs));
  options.training_memory_budget_bytes = config_.training.memory_budget_mib << 20;
  const auto t0 = std::chrono::steady_clock::now();
  auto engine = engine::Engine::Start(options);
  if (!engine.ok()) {
    return absl::Status(engine.status().code(),
                        absl::StrCat("loading the model: ", engine.status().message()));
  }
  engine_ = std::move(*engine);
  if (const std::string note = engine_->chat_template_note(); !note.empty()) {
    spdlog::warn(
        "chat template: {} (training and Chat render the same way, without it; "
        "model.chat_template names a family to render instead)",
        note);
  }
  const engine::DeviceInfo& device = engine_->device();
  spdlog::info("model loaded in {:.1f} s ({} base weights, {:.1f} MiB) on {} ({}), torch {}",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
               config_.model.base_weights, engine_->Stats().base_bytes / 1048576.0, device.device,
               device.dtype, device.torch_version);
  job_runner_ =
      std::make_unique<JobRunner>(*engine_, *jobs_, job_events_, metrics_, JobsDir(), dataset_root_,
                                  static_cast<int>(config_.training.max_running_jobs));
  RegisterEngineMetrics();
  return absl::OkStatus();
}

absl::Status Daemon::CheckJobData(const lorad::v1::JobSpec& spec,
                                  const std::atomic<bool>* abandon) const {
  // The records the job's template cannot take and files with no usable example, found by
  // formatting the first records of each file as the job will (a large dataset is not tokenized
  // twice). Inline examples go to a scratch folder first, as the job writes them.
  constexpr int64_t kCheckedRecords = 4096;
  namespace fs = std::filesystem;
  const fs::path scratch_root = fs::path(config_.storage.data_dir) / "tmp";
  std::error_code ec;
  fs::create_directories(scratch_root, ec);
  std::string scratch = (scratch_root / "submit-XXXXXX").string();
  if (ec || mkdtemp(scratch.data()) == nullptr) {
    // Storage refuses (RESOURCE_EXHAUSTED, as the job database's full disk is): say why.
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot create a scratch folder in ", scratch_root.string(), ": ",
                     ec ? ec.message() : std::strerror(errno),
                     "; free space in storage.data_dir or make it writable"));
  }
  auto config = TrainingJobConfigFromSpec(spec, scratch, dataset_root_);
  absl::Status checked =
      config.ok() ? engine_->CheckTrainingData(*config, kCheckedRecords, abandon) : config.status();
  fs::remove_all(scratch, ec);
  if (absl::IsUnavailable(checked)) return absl::ResourceExhaustedError(checked.message());
  if (!absl::IsInvalidArgument(checked)) return checked;
  // Inline records are named as the request has them (the scratch file is gone); a file is
  // named by its path. The merged export's own check names its field.
  if (absl::StartsWith(checked.message(), kInlineExamples) ||
      absl::StartsWith(checked.message(), "export_merged")) {
    return checked;
  }
  return absl::InvalidArgumentError(absl::StrCat("dataset: ", checked.message()));
}

std::string Daemon::JobsDir() const {
  return (std::filesystem::path(config_.storage.data_dir) / "jobs").string();
}

absl::Status Daemon::LockDataDir() {
  // Two daemons on one data folder would both resume its running jobs into the same folders.
  // The lock is the kernel's, on the folder itself (a lock file could be deleted under a running
  // daemon, taken for a stale pid file): it ends with the process, also after kill -9.
  const std::string& dir = config_.storage.data_dir;
  data_dir_lock_ = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (data_dir_lock_ < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("storage.data_dir: cannot open ", dir, ": ", std::strerror(errno)));
  }
  // The holder's pid, for the message a second daemon gives.
  const std::string pid_path = (std::filesystem::path(dir) / "lorad.lock").string();
  if (::flock(data_dir_lock_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(data_dir_lock_);
    data_dir_lock_ = -1;
    if (err != EWOULDBLOCK) {  // no other daemon: the folder's filesystem takes no such lock
      return absl::FailedPreconditionError(absl::StrCat(
          "storage.data_dir '", dir, "': cannot lock it (", std::strerror(err),
          "); its filesystem does not take the lock that keeps a second lorad off it (NFS "
          "without local locks?): put the data folder on a local disk, or mount it with "
          "local_lock=all"));
    }
    std::string pid;
    std::getline(std::ifstream(pid_path), pid);
    return absl::FailedPreconditionError(
        absl::StrCat("storage.data_dir '", dir, "' is in use by another lorad",
                     pid.empty() ? "" : absl::StrCat(" (pid ", pid, ")"),
                     "; stop it, or give this one another --data-dir"));
  }
  // With the host name: a pid is another namespace's in a container (Docker's host name is the
  // container's id), and "pid 1" read on the host would name init.
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  std::ofstream pid_file(pid_path, std::ios::trunc);
  pid_file << ::getpid() << " on host " << host << "\n";
  pid_file.flush();
  if (!pid_file) {
    const int err = errno;
    return StartupStorageError(
        err, absl::StrCat("storage.data_dir: cannot write ", pid_path, ": ", std::strerror(err)));
  }
  return absl::OkStatus();
}

std::string Daemon::KeyAt(const std::string& key) const {
  auto it = config_.set_at.find(key);
  return it == config_.set_at.end() ? key : absl::StrCat(it->second, ": ", key);
}

absl::Status Daemon::OpenJobStore() {
  namespace fs = std::filesystem;
  dataset_root_ = config_.storage.dataset_root.empty()
                      ? (fs::path(config_.storage.data_dir) / "datasets").string()
                      : config_.storage.dataset_root;
  // Both roots before the model loads (minutes for a large one): a typo fails at once.
  adapter_root_ = config_.storage.adapter_root.empty()
                      ? (fs::path(config_.storage.data_dir) / "adapters").string()
                      : config_.storage.adapter_root;
  for (const auto& [key, root] : {std::pair{"storage.dataset_root", &dataset_root_},
                                  std::pair{"storage.adapter_root", &adapter_root_}}) {
    std::error_code ec;
    if (fs::create_directories(*root, ec)) spdlog::info("created the folder {} ({})", *root, key);
    if (ec) {
      return absl::InvalidArgumentError(
          absl::StrCat(KeyAt(key), ": cannot create '", *root, "': ", ec.message()));
    }
  }
  std::error_code ec;
  const std::string db_path = (fs::path(config_.storage.data_dir) / "jobs.db").string();
  auto store = JobStore::Open(db_path);
  if (!store.ok()) return store.status();
  jobs_ = std::move(*store);
  // One another account can read (JobStore::Open makes it its owner's alone) is said.
  if (struct stat st{}; stat(db_path.c_str(), &st) == 0 && (st.st_mode & 0077) != 0) {
    spdlog::warn(
        "{} can be read by other accounts (mode {:o}): it holds every job's spec and "
        "inline examples; chmod 600 it",
        db_path, st.st_mode & 0777);
  }
  // A database that knows no job beside a jobs folder that holds some was lost or replaced (a
  // deleted or truncated file opens as a new, empty one): starting would forget those jobs and
  // publish their adapter names from version 1 again.
  // The store's errors name the file and say what to do (a damaged one, a full disk, one that
  // cannot be written); others are said to be about it.
  const auto damaged = [&db_path](const absl::Status& s) {
    if (absl::StrContains(s.message(), db_path)) return s;
    return absl::Status(s.code(), absl::StrCat("job database '", db_path, "': ", s.message()));
  };
  // A deletion a crash interrupted: its folder back, or gone (before the count of job folders).
  deleted_job_folders_ = FinishInterruptedDeletions(*jobs_, JobsDir());
  if (const int64_t n = MakeJobExamplesPrivate(JobsDir())) {
    spdlog::info("made {} job files holding examples readable by lorad's account alone", n);
  }
  auto counts = jobs_->CountByState();
  if (!counts.ok()) return damaged(counts.status());
  int64_t known = 0;
  for (const auto& [state, n] : *counts) known += n;
  if (known == 0) {
    int64_t folders = 0;
    for (const auto& entry : fs::directory_iterator(JobsDir(), ec)) {
      folders += entry.is_directory() && entry.path().filename().string().rfind("job-", 0) == 0;
    }
    if (folders > 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job database '", db_path, "' holds no job, but ", JobsDir(), " holds ", folders,
          " job folders: the database was lost or replaced; ", kRestoreAdvice, ", or move ",
          JobsDir(), " aside to start with an empty job queue (and adapter versions from 1)"));
    }
  } else {
    // Job folders it does not know: an older copy of the database (a restored backup, a copy
    // made without jobs.db-wal) forgot the jobs made since. Nothing lists or deletes those
    // folders, and the versions their adapters published may be published again.
    std::vector<std::string> unknown;
    for (const auto& entry : fs::directory_iterator(JobsDir(), ec)) {
      const std::string name = entry.path().filename().string();
      if (!entry.is_directory() || name.rfind("job-", 0) != 0) continue;
      if (absl::IsNotFound(jobs_->Get(name).status())) unknown.push_back(name);
    }
    if (!unknown.empty()) {
      const size_t shown = std::min<size_t>(unknown.size(), 5);
      spdlog::warn(
          "{} holds {} job folder(s) the job database '{}' does not know ({}{}): is the database "
          "older than they are (a restored backup, or a copy made without jobs.db-wal)? Their "
          "jobs are not listed, and adapter versions they published may be published again; "
          "restore the newer database, or move those folders aside",
          JobsDir(), unknown.size(), db_path,
          absl::StrJoin(unknown.begin(), unknown.begin() + static_cast<std::ptrdiff_t>(shown),
                        ", "),
          unknown.size() > shown ? ", ..." : "");
    }
  }
  if (auto s = FollowMovedFolders(); !s.ok()) return damaged(s);
  // A job that was running when the last process stopped goes back to the queue; its trainer
  // resumes from the last checkpoint. One that was running at each of the last
  // kMaxUncleanStops deaths of the daemon in a row, getting no further in between, fails instead.
  auto recovered = jobs_->RecoverAfterRestart(kMaxUncleanStops);
  if (!recovered.ok()) return damaged(recovered.status());
  if (recovered->unclean_stop) {
    spdlog::warn(
        "the last lorad on this data folder ({}) did not stop cleanly (a crash, an out-of-memory "
        "kill, kill -9 or a power cut); its log, and the system's, say why",
        *recovered->unclean_stop);
  }
  for (const auto& id : recovered->requeued) {
    // After a clean stop this is the plan, not a warning.
    spdlog::log(recovered->unclean_stop ? spdlog::level::warn : spdlog::level::info,
                "job {} was running at the last stop; queued again, to run first", id);
    // What the dead run recorded past the checkpoint the job resumes from goes now, as RetryJob
    // does, not once the job starts: while it waited in the queue (behind a job first in line,
    // or more of them than training.max_running_jobs) listings showed progress it had lost, and
    // a watch, taking the resumed run's steps for ones it had sent, skipped them.
    const int64_t resumes_at = NewestCheckpoint((fs::path(JobsDir()) / id).string()).first;
    if (auto s = jobs_->ForgetHistoryAfter(id, resumes_at); !s.ok()) {
      spdlog::warn(
          "job {}: its history after step {}, where it resumes, could not be removed "
          "({}): until it gets past those steps again, its progress reads as the last "
          "run's",
          id, resumes_at, std::string(s.message()));
    }
  }
  for (const auto& [id, error] : recovered->failed) spdlog::error("job {} failed: {}", id, error);
  JobStore* jobs = jobs_.get();
  metrics_.AddGaugeFamilyCallback("lorad_jobs", "Training jobs by state", {"state"}, [jobs] {
    std::vector<std::pair<LabelValues, double>> series;
    // A database that cannot be read gives no series (an alert on absent() fires), not zeros
    // that read as an idle daemon.
    auto counts = jobs->CountByState();
    if (!counts.ok()) {
      spdlog::warn("lorad_jobs: {}", std::string(counts.status().message()));
      return series;
    }
    for (JobState state : {JobState::kQueued, JobState::kRunning, JobState::kSucceeded,
                           JobState::kFailed, JobState::kCancelled}) {
      series.push_back({{JobStateName(state)}, 0.0});
    }
    for (const auto& [state, n] : *counts) {
      for (auto& s : series) {
        if (s.first[0] == JobStateName(state)) s.second = static_cast<double>(n);
      }
    }
    return series;
  });
  return absl::OkStatus();
}

absl::Status Daemon::LoadTokens() {
  for (size_t i = 0; i < config_.auth.tokens.size(); ++i) {
    const AuthToken& t = config_.auth.tokens[i];
    auto role = RoleFromName(t.role);
    absl::Status added = role.ok() ? auth_.Add(t.token, *role, t.name) : role.status();
    if (!added.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(t.where, ": auth.tokens[", i, "]: ", added.message()));
    }
  }
  if (auth_.enabled()) {
    spdlog::info("{} bearer token(s) configured", config_.auth.tokens.size());
  } else {
    spdlog::warn("no auth.tokens configured: every caller of {} is an admin",
                 config_.server.grpc_address);
  }
  return absl::OkStatus();
}

absl::Status Daemon::StartGrpc() {
  // lorad's own health service (HealthService: gRPC's built-in one never ends Watch streams).
  grpc::EnableDefaultHealthCheckService(false);
  health_ = std::make_unique<HealthService>(
      std::vector<std::string>(std::begin(kServiceNames), std::end(kServiceNames)));
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  // Two threads read datasets for SubmitJob (a large one takes a minute); two check submissions
  // of inline examples only; two more read adapter files for LoadAdapter and remove DeleteJob's
  // folders: none waits behind the dataset counts.
  blocking_calls_ = std::make_unique<BlockingCalls>(2, 64);
  file_free_calls_ = std::make_unique<BlockingCalls>(2, 64);
  admin_calls_ = std::make_unique<BlockingCalls>(2, 64);
  TrainingServiceOptions training;
  training.blocking = blocking_calls_.get();
  training.file_free = file_free_calls_.get();
  training.deletions = admin_calls_.get();
  training.hold_job_folders = [runner = job_runner_.get()] { return runner->HoldJobFolders(); };
  training.spec_limits.dataset_root = dataset_root_;
  training.spec_limits.model_layers = engine_->model_config().num_hidden_layers;
  training.max_queued_jobs = config_.limits.max_queued_jobs;
  JobRunner* runner = job_runner_.get();
  training.on_submit = [runner] { runner->Wake(); };
  training.on_cancel = [runner](const std::string& id) { runner->Cancel(id); };
  BlockingCalls* deletions = admin_calls_.get();
  training.delete_job = [runner, deletions](const std::string& id) {
    return runner->DeleteJob(id, &deletions->stopping());
  };
  training.waiting_for = [runner](const std::string& id, bool first_in_line) {
    return runner->WaitingFor(id, first_in_line);
  };
  training.retry_job = [runner, max_queued = config_.limits.max_queued_jobs](
                           const std::string& id) { return runner->RetryJob(id, max_queued); };
  training.auth = &auth_;
  // A job is refused at once, not queued to fail later (after waiting behind running jobs),
  // when it could never fit the training memory or its data would fail at its start.
  training.check_job = [this](const lorad::v1::JobSpec& spec,
                              const std::atomic<bool>* abandon) -> absl::Status {
    auto fits = engine_->TrainingFitsNow(TrainingJobConfigOf(spec, ""));
    if (!fits.ok()) return fits.status();
    return CheckJobData(spec, abandon);  // given up with the call (deadline, cancel, shutdown)
  };
  services_.push_back(std::make_unique<TrainingService>(*jobs_, job_events_, training));
  InferenceOptions inference;
  inference.max_new_tokens = static_cast<int32_t>(config_.limits.max_new_tokens);
  // A prompt larger than a request could never arrive (ValidateServerConfig refuses the two set
  // so; the default prompt limit follows a smaller request limit).
  inference.max_prompt_bytes =
      std::min(config_.limits.max_prompt_bytes, config_.server.max_request_bytes);
  inference.max_open_streams = config_.limits.max_queued_requests;
  inference.max_streams_per_client = config_.limits.max_streams_per_client;
  inference.max_unread_stream_bytes = config_.limits.max_unread_stream_bytes;
  inference.defaults = generation_defaults_;
  auto inference_service =
      std::make_unique<InferenceService>(*engine_, metrics_, inference, &auth_);
  InferenceService* serving = inference_service.get();
  services_.push_back(std::move(inference_service));
  services_.push_back(std::make_unique<AdapterService>(
      *engine_, adapter_root_, &auth_, jobs_.get(), admin_calls_.get(),
      [runner] { return runner->HoldJobFolders(); },
      [serving](const std::string& name) { serving->ForgetAdapter(name); },
      config_.limits.max_loaded_adapters));

  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (tls_) credentials = tls_->Credentials();
  builder.AddListeningPort(config_.server.grpc_address, credentials, &grpc_port_);
  // gRPC sets SO_REUSEPORT by default, which lets a second daemon silently share the port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(static_cast<int>(config_.server.max_request_bytes));
  // Dead peers: gRPC's own server keepalive is two hours, so a client gone without a FIN kept
  // its streams that long. Pings go to idle connections too, and keep going while a stream's
  // writes wait on a client that stopped reading.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                             static_cast<int>(config_.server.keepalive_seconds * 1000));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                             static_cast<int>(config_.server.keepalive_timeout_seconds * 1000));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  // Clients' own keepalive pings: allowed every 10 s (the default policy answers a client that
  // pings more often than every 5 minutes with GOAWAY "too_many_pings").
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  for (auto& service : services_) builder.RegisterService(service.get());
  builder.RegisterService(health_.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<RpcMetricsInterceptorFactory>(metrics_));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));

  grpc_server_ = builder.BuildAndStart();
  if (!grpc_server_ || grpc_port_ == 0) {
    grpc_server_.reset();
    return absl::UnavailableError(
        absl::StrCat("server.grpc_address: cannot listen on ", config_.server.grpc_address,
                     " (it could at start-up: taken since, while the model loaded?); choose "
                     "another with --grpc-address"));
  }
  return absl::OkStatus();
}

absl::Status Daemon::RecordForcedStop(std::chrono::milliseconds budget) {
  if (!marked_running_.exchange(false)) return absl::OkStatus();
  return jobs_->MarkDaemonStoppedWithin(budget);
}

void Daemon::Shutdown() {
  if (!grpc_server_ && state_.Get() != Lifecycle::kServing) {
    http_.Stop();
    return;
  }
  state_.Set(Lifecycle::kDraining);
  // Training first: running jobs checkpoint now (they resume at the next start), not after the
  // RPC grace period, which a container's stop timeout may not outlast.
  if (job_runner_) job_runner_->StopStartingJobs();
  if (engine_) {
    // Each job's own line (the job runner's) says whether it checkpointed and resumes: this count
    // holds jobs still reading their data and jobs ending by a cancel too.
    if (const int jobs = engine_->StopTraining(); jobs > 0) {
      spdlog::info("training stopped: {} active job(s)", jobs);
    }
  }
  if (grpc_server_) {
    // NOT_SERVING, and health watches (client-side health checking) end: each held the stop for
    // the whole grace.
    health_->Shutdown();
    spdlog::info("draining: in-flight RPCs get {} s", config_.server.shutdown_grace_seconds);
    job_events_.CloseAll();  // job watches never end by themselves
    // UnloadAdapter calls waiting on running requests answer now, as at their deadline (the
    // unload took effect): cut by the grace period they read as failed, and a client retried.
    if (engine_) engine_->adapters().EndUnloadWaits();
    // Calls reading files end (a dataset's count gives up): the server waits for every call.
    for (auto* calls : {&blocking_calls_, &file_free_calls_, &admin_calls_}) {
      if (*calls) (*calls)->Stop();
    }
    grpc_server_->Shutdown(std::chrono::system_clock::now() +
                           std::chrono::seconds(config_.server.shutdown_grace_seconds));
    grpc_server_->Wait();
    grpc_server_.reset();
  }
  // The runner then records the events still queued.
  if (engine_) engine_->Stop();
  if (job_runner_) job_runner_->Stop();
  if (marked_running_.exchange(false)) {
    if (auto s = jobs_->MarkDaemonStopped(); !s.ok()) {
      spdlog::warn(
          "the job database did not record this clean stop ({}): the next start "
          "counts it against the jobs that were running",
          std::string(s.message()));
    }
  }
  http_.Stop();
  spdlog::info("stopped");
}

}  // namespace lorad::server
