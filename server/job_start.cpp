// JobRunner: which queued job starts next, and its start.
//
// Jobs start in the queue's order (JobStore::NextQueued). A job first in line that waits for
// training memory (training.memory_budget_mib, or the pinned host memory offloading takes) would
// hold every job behind it, a small one too, until running jobs end. A job behind it starts
// first where that can never make it wait longer, however the running jobs end: for every set of
// them beside which the waiting job would fit (with a slot of training.max_running_jobs), it also
// fits beside that set and the job started first (Engine::TrainingLeavesRoomFor). By induction
// the jobs so started never hold it back together either (EASY backfilling, with room kept rather
// than run times, which lorad does not know).
#include <algorithm>
#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "server/job_runner.h"
#include "server/job_spec_validator.h"
#include "server/training_service.h"
#include "spdlog/spdlog.h"

namespace lorad::server {
namespace {

using engine::TrainingEvent;

// Queued jobs behind the first one looked at for a start ahead of it, at each look.
constexpr size_t kLookAhead = 16;

}  // namespace

void JobRunner::StartNextJob() {
  {
    // The engine frees a job's memory before its last event reaches pending_; while that event
    // waits, the store still says the job runs. Handle it first (it looks again after), so the
    // store never shows a job started in memory that a finished one still holds there.
    std::lock_guard<std::mutex> lock(mu_);
    for (const Pending& p : pending_) {
      if (p.event.kind == TrainingEvent::Kind::kFinished ||
          p.event.kind == TrainingEvent::Kind::kFailed) {
        return;
      }
    }
  }
  std::unique_lock<std::mutex> folders(folders_mu_);
  auto queued = store_.NextQueued(1 + kLookAhead);
  if (!queued.ok() || queued->empty()) return;
  const JobRecord& job = queued->front();
  if (unrecorded_failures_.count(job.id) > 0) {
    // It failed, and the database refused to record that (a full disk): it still reads as
    // queued. Starting it again would fail it again at once, every turn; the queue waits until
    // RecordFailuresAgain records it (every other write would be refused too).
    start_again_at_ = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    return;
  }
  lorad::v1::JobSpec spec;
  if (!spec.ParseFromString(job.spec)) {
    FailJob(job.id, "the stored job spec is unreadable");
    return;
  }
  // Storage that refuses the job's folder or its records (a full disk, jobs/ not writable) or the
  // database's write: the job stays queued, tried again every few seconds, as README says. Failing
  // it left it failed for good once the disk had room again.
  auto config = TrainingJobConfigFromSpec(spec, jobs_dir_ + "/" + job.id, dataset_root_);
  if (!config.ok()) {
    if (absl::IsUnavailable(config.status())) {
      WaitForStorage(job.id, config.status());
    } else {
      FailJob(job.id, std::string(config.status().message()));
    }
    return;
  }
  // The memory planner: a job that can never fit fails saying what it needs; one that fits only
  // once a running job ends stays queued (the runner looks again when a job ends).
  std::string waits_for;
  absl::StatusOr<bool> fits = engine_.TrainingFitsNow(*config, &waits_for);
  if (!fits.ok()) {
    FailJob(job.id, std::string(fits.status().message()));
    return;
  }
  if (!*fits) {
    {
      // Said once (GetJob's waiting_for says it while it lasts): the log showed only "queued".
      std::lock_guard<std::mutex> lock(mu_);
      if (memory_wait_logged_.insert(job.id).second) {
        spdlog::info(
            "job {} ({}) waits for training memory: it needs {}; it starts when a running "
            "job ends",
            job.id, job.adapter_name, waits_for);
      }
      memory_wait_ = {job.id, waits_for};
    }
    StartOneAhead(job, *config, *queued, folders);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    memory_wait_ = {};
    memory_wait_logged_.erase(job.id);
  }
  StartJob(job, *config, folders, /*first_in_line=*/true);
}

void JobRunner::StartOneAhead(const JobRecord& first, const engine::TrainingJobConfig& first_config,
                              const std::vector<JobRecord>& queued,
                              std::unique_lock<std::mutex>& folders) {
  for (size_t i = 1; i < queued.size(); ++i) {
    const JobRecord& job = queued[i];
    if (unrecorded_failures_.count(job.id) > 0) continue;
    // A spec or a dataset that cannot start fails the job once it is first in line, as always.
    lorad::v1::JobSpec spec;
    if (!spec.ParseFromString(job.spec)) continue;
    // Screened by the spec alone (no file is touched for a job that does not start here).
    const engine::TrainingJobConfig screened = TrainingJobConfigOf(spec, jobs_dir_ + "/" + job.id);
    const absl::StatusOr<bool> fits = engine_.TrainingFitsNow(screened);
    if (!fits.ok() || !*fits) continue;
    const absl::StatusOr<bool> leaves_room =
        engine_.TrainingLeavesRoomFor(first_config, screened, max_running_);
    if (!leaves_room.ok() || !*leaves_room) continue;
    auto config = TrainingJobConfigFromSpec(spec, jobs_dir_ + "/" + job.id, dataset_root_);
    if (!config.ok()) continue;
    spdlog::info(
        "job {} ({}) starts ahead of job {} ({}), which waits for training memory: it fits now, "
        "and job {} keeps its room beside it however the running jobs end",
        job.id, job.adapter_name, first.id, first.adapter_name, first.id);
    StartJob(job, *config, folders, /*first_in_line=*/false);
    return;
  }
}

void JobRunner::WaitForStorage(const std::string& job_id, const absl::Status& s) {
  if (!start_refused_) {
    spdlog::error("job {} cannot start: {}; trying again every few seconds", job_id,
                  std::string(s.message()));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    storage_wait_ = {job_id, std::string(s.message())};
  }
  start_refused_ = true;
  start_again_at_ = std::chrono::steady_clock::now() + std::chrono::seconds(5);
}

bool JobRunner::StartJob(const JobRecord& job, const engine::TrainingJobConfig& config,
                         std::unique_lock<std::mutex>& folders, bool first_in_line) {
  const int64_t started_ms = JobTimeMs();  // stored and published alike: a replay shows the same
  {
    // Before MarkRunning: a CancelJob right after it must find the job running here, or the
    // engine would never hear of it (see the check after StartTraining).
    std::lock_guard<std::mutex> lock(mu_);
    running_.insert(job.id);
  }
  if (auto s = store_.MarkRunning(job.id, started_ms); !s.ok()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_.erase(job.id);
    }
    {
      std::lock_guard<std::mutex> lock(progress_mu_);
      cancelled_.erase(job.id);
    }
    if (absl::IsFailedPrecondition(s) || absl::IsNotFound(s)) {
      Wake();  // cancelled (or deleted) meanwhile: look for the next one
    } else if (first_in_line) {
      WaitForStorage(job.id, s);  // looking again at once would spin on it
    } else {
      // Not the line's wait (GetJob's waiting_for names the first in line's): its turn comes.
      spdlog::debug("job {} could not start ahead: {}", job.id, std::string(s.message()));
      start_again_at_ = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    }
    return false;
  }
  if (first_in_line) {
    start_refused_ = false;
    std::lock_guard<std::mutex> lock(mu_);
    storage_wait_ = {};
  }
  folders.unlock();
  {
    std::lock_guard<std::mutex> lock(mu_);
    look_for_jobs_ = true;  // room for another? the loop looks again (and stops at max_running_)
  }
  events_.Publish(StateEvent(job.id, JobState::kRunning, started_ms));
  if (job.attempts == 0) {
    spdlog::info("job {} ({}) started", job.id, job.adapter_name);
  } else {
    const auto [step, checkpoint] = ResumePoint(job.id);
    if (!checkpoint.empty()) {
      spdlog::info("job {} ({}) started again: resuming from {}", job.id, job.adapter_name,
                   checkpoint);
    } else {
      spdlog::info(
          "job {} ({}) started again from its first step: its folder holds no complete "
          "checkpoint (it stopped before writing one, or they were removed)",
          job.id, job.adapter_name);
    }
    // What the last run recorded past the checkpoint this one resumes from is gone now, not
    // once the trainer has prepared its data (a watch meanwhile replayed the dead run's steps
    // and missed this run's); a damaged newest checkpoint is passed over, and the trainer's
    // report of the one it resumes from forgets more (Handle).
    ForgetHistoryAfter(job.id, step);
  }
  const std::string id = job.id;
  const std::string adapter = job.adapter_name;
  absl::Status started =
      engine_.StartTraining(id, config, [this, id, adapter](const TrainingEvent& e) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          pending_.push_back({id, adapter, e});
        }
        wake_.notify_all();
      });
  if (started.ok()) {
    // A CancelJob since MarkRunning reached the engine before the job did, which ignored it.
    bool cancelled = false;
    {
      std::lock_guard<std::mutex> lock(progress_mu_);
      cancelled = cancelled_.count(id) > 0;
    }
    if (cancelled) engine_.CancelTraining(id);
    return true;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    running_.erase(id);
  }
  {
    std::lock_guard<std::mutex> lock(progress_mu_);
    cancelled_.erase(id);
  }
  // The shutdown stopped training as this job started: it stays running in the store, and
  // starts again at the next start like any job a shutdown interrupted.
  if (absl::IsUnavailable(started)) {
    spdlog::info("job {} starts at the next start: {}", id, std::string(started.message()));
    return false;
  }
  FailJob(id, std::string(started.message()));
  return false;
}

}  // namespace lorad::server
