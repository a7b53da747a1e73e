// JobRunner: takes queued jobs from the JobStore, in priority order (one that fits may start
// ahead of one waiting for training memory where that one keeps its room: job_start.cpp), up to
// max_running at once (training.max_running_jobs), runs each on the engine's GPU loop, and turns
// the trainer's events into durable rows (steps, final state), JobEvents for the WatchJob streams,
// per-job metrics, and, when a job succeeds, a published adapter version.
//
// Every job trains into <jobs_dir>/<job id>/ (checkpoints, then adapter/): a job that was running
// when the daemon died is queued again by JobStore::RecoverAfterRestart and resumes from its
// newest checkpoint there.
//
// Thread rules: the engine delivers trainer events on its loop thread; they are only queued
// there. The runner's own thread does the SQLite writes, publishing and the next job's start, so
// a slow job database never stalls the GPU loop (the trainer writes its periodic checkpoints on
// a thread of its own, the end's too; a shutdown's runs on the loop). Cancel may be called from
// any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/runtime/engine.h"
#include "lorad/v1/training.pb.h"
#include "server/job_event_hub.h"
#include "server/job_store.h"
#include "server/metrics_registry.h"

namespace lorad::server {

// Finishes what a DeleteJob interrupted by a crash left in `jobs_dir`: a folder moved aside
// (.deleted-<id>) goes back if the store still has the job (its record was not deleted); the
// others, of deleted jobs, are returned for JobRunner::RemoveInBackground. Called at start,
// before any call is served.
std::vector<std::string> FinishInterruptedDeletions(JobStore& store, const std::string& jobs_dir);

// Makes the files of the jobs in `jobs_dir` that hold or quote their examples
// (inline_dataset.jsonl, eval_report.json) their owner's alone, as jobs.db is; an older lorad
// wrote them 0644. Returns how many it changed. Called at start.
int64_t MakeJobExamplesPrivate(const std::string& jobs_dir);

// Removes from an ended job's folder what only resuming it or its merged export needed: its
// checkpoints (checkpoint-N, and the temp or replaced ones a crash left) and merged/, keeping
// its adapter and reports. The bytes removed. DeleteJob frees this much when the job database's
// full disk refuses to delete the record, so that deleting it again goes through.
int64_t RemoveCheckpointsAndExport(const std::string& folder);

// The step and folder of the newest complete checkpoint in a job's folder (where the job resumes),
// after putting back one a kill left aside while replacing it; {0, ""} without one.
std::pair<int64_t, std::string> NewestCheckpoint(const std::string& job_folder);

class JobRunner {
 public:
  JobRunner(engine::Engine& engine, JobStore& store, JobEventHub& events, MetricsRegistry& metrics,
            std::string jobs_dir, std::string dataset_root, int max_running = 1);
  ~JobRunner();  // Stop()

  // Starts the runner thread; it looks for queued jobs at once and after every Wake().
  void Start();
  // Stops taking jobs and waits for the runner thread; the engine's Stop ends a running job
  // (with a checkpoint) and its final events are still recorded if they arrive before this.
  void Stop();
  // The daemon is shutting down: start no queued job from now on (running ones end with the
  // engine's Stop, and their events are still recorded until Stop()).
  void StopStartingJobs();
  // A job was queued: look again.
  void Wake();
  // A job was cancelled in the store (any state): stop it if it is running.
  void Cancel(const std::string& job_id);
  // Deletes an ended job: moves its folder aside to <jobs_dir>/.deleted-<id>, deletes its record
  // (JobStore::Delete; the folder is moved back if that fails), then removes the folder; what a
  // crash leaves of one, FinishInterruptedDeletions sorts out. FAILED_PRECONDITION while the job's
  // trainer has not ended (a cancelled job still stopping) or while an adapter is served from its
  // folder (a restart reads it from there).
  // The files go after the lock is released, on the caller's thread; `stop` turning true (a
  // shutdown) leaves the rest for the next start.
  absl::Status DeleteJob(const std::string& job_id, const std::atomic<bool>* stop = nullptr);
  // RetryJob: a failed or cancelled job queued again (JobStore::Requeue), to resume from its
  // last checkpoint, its history after that forgotten at once (a watch or a listing meanwhile
  // showed the run it resumes from no further than the job will); FAILED_PRECONDITION while
  // its trainer has not ended.
  absl::StatusOr<JobRecord> RetryJob(const std::string& job_id, int64_t max_queued);
  // Removes these folders (FinishInterruptedDeletions') on a thread of their own; Stop() ends it,
  // leaving what is left for the next start.
  void RemoveInBackground(std::vector<std::string> folders);
  // Held while an adapter from any folder is recorded as served (AdapterService): a job's folder
  // is never deleted between a check that it exists and that record, nor recorded once gone.
  // Why queued jobs have not started, as far as the runner knows (Job.waiting_for): the running
  // jobs fill training.max_running_jobs, or the job first in line waits for training memory
  // (`first_in_line`: the job asked about is first in line); "" when nothing holds them.
  std::string WaitingFor(const std::string& job_id, bool first_in_line);
  std::unique_lock<std::mutex> HoldJobFolders() {
    return std::unique_lock<std::mutex>(folders_mu_);
  }

 private:
  struct Pending {
    std::string job_id;
    std::string adapter;  // the job's adapter_name
    engine::TrainingEvent event;
  };
  void Loop();
  // The next queued job, if it can start now; if it waits for training memory, a job behind it
  // that fits now and leaves it its room (job_start.cpp). Runner thread only.
  void StartNextJob();
  // Starts the first job of `queued` (after `first`, which waits for memory) that fits now and
  // can never hold `first` back: see job_start.cpp.
  void StartOneAhead(const JobRecord& first, const engine::TrainingJobConfig& first_config,
                     const std::vector<JobRecord>& queued, std::unique_lock<std::mutex>& folders);
  // Marks the job running and hands it to the engine; `folders` (folders_mu_, held) is released
  // once the job's record says running. Whether the engine took it (else it stays queued, waits
  // for storage, or failed). `first_in_line`: else started ahead of the first, whose storage wait
  // (storage_wait_) a refusal of this one does not stand for.
  bool StartJob(const JobRecord& job, const engine::TrainingJobConfig& config,
                std::unique_lock<std::mutex>& folders, bool first_in_line);
  // The job cannot start for its storage (`s`): logged once, looked at again in a few seconds.
  void WaitForStorage(const std::string& job_id, const absl::Status& s);
  // DeleteJob's last check: FAILED_PRECONDITION when a served adapter lives in `folder` (a
  // restart reads it from there) or a queued or running job continues one from there.
  absl::Status CheckFolderUnread(const std::string& job_id, const std::filesystem::path& folder);
  void Handle(const Pending& pending);
  // Stores an evaluation or checkpoint event with the job and publishes it if it is new;
  // `replayed` (reported again by a resumed job) keeps a row already there as it is.
  void PublishKept(const std::string& job_id, int64_t step, const lorad::v1::JobEvent& event,
                   bool replayed = false);
  void FailJob(const std::string& job_id, const std::string& error);
  // The step and folder of the job's newest complete checkpoint (under its folder in jobs_dir_),
  // where it resumes; {0, ""} without one.
  std::pair<int64_t, std::string> ResumePoint(const std::string& job_id) const;
  // JobStore::ForgetHistoryAfter, a failure logged (the rows are only stale until replaced).
  void ForgetHistoryAfter(const std::string& job_id, int64_t step);
  // A job that trained to its end: recorded as succeeded and its adapter published.
  void Succeed(const Pending& finished);

  engine::Engine& engine_;
  JobStore& store_;
  JobEventHub& events_;
  GaugeFamily& job_loss_;
  GaugeFamily& job_lr_;
  GaugeFamily& job_tokens_per_s_;
  GaugeFamily& job_step_;
  CounterFamily& trained_tokens_;
  std::string jobs_dir_;
  std::string dataset_root_;
  int max_running_;  // jobs handed to the engine at once; 0: jobs stay queued

  // Held by StartNextJob from choosing a job until it runs (it writes the job's folder first),
  // by DeleteJob until the job's record is gone, and by HoldJobFolders' callers.
  std::mutex folders_mu_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<Pending> pending_;
  std::set<std::string> running_;  // jobs handed to the engine and not yet ended
  // The queued job first in line that waits for training memory, and what it needs; the jobs
  // whose wait was logged (once each, until they start).
  std::pair<std::string, std::string> memory_wait_;
  std::set<std::string> memory_wait_logged_;
  // The queued job first in line that cannot start for its storage (a full disk, a folder that
  // cannot be written), and why: tried again every few seconds.
  std::pair<std::string, std::string> storage_wait_;
  // Running jobs CancelJob has ended (and published as cancelled): steps the engine still
  // finishes are neither recorded nor published, so a live watch, which ends at the cancelled
  // state, and a later replay tell the same history. progress_mu_ is held while a job's progress
  // is checked against it, recorded and published, and while Cancel adds to it: a step is then
  // either published before the cancelled state or not at all.
  std::mutex progress_mu_;
  std::set<std::string> cancelled_;
  // Runner thread only: the total steps stored for each running job, as its trainer counts them
  // (the dataset is read again when the job starts and may have changed since submission).
  std::map<std::string, int64_t> job_total_steps_;
  // Runner thread only: failures the store could not record yet (a full disk), retried on every
  // turn of the loop, so a failed job never reads as running for ever.
  std::map<std::string, std::string> unrecorded_failures_;
  void RecordFailuresAgain();
  // Runner thread only: cancels the store holds in memory because the database refused them
  // (JobStore::Cancel), written on every turn of the loop once it takes writes.
  void RecordCancelsAgain();
  // Runner thread only: when to look for a job to start again after the store refused to mark
  // one running (a full disk), and whether the last try was refused (said once in the log).
  std::optional<std::chrono::steady_clock::time_point> start_again_at_;
  bool start_refused_ = false;
  // Runner thread only: ended jobs whose success the store could not record yet (their adapter
  // serves only once it does), retried every few seconds.
  struct UnrecordedSuccess {
    Pending pending;
    std::chrono::steady_clock::time_point last_try;
  };
  std::map<std::string, UnrecordedSuccess> unrecorded_successes_;
  void RecordSuccessesAgain();
  // Runner thread only: a running job's history (steps, evaluations, checkpoints, warnings) the
  // store could not record when it came (a full disk, a moment's lock), in order, recorded on
  // the next turns of the loop so that a replay (WatchJob, a restart) lacks nothing. Watchers
  // got it live. At most kMaxUnrecordedHistory rows wait; past that the oldest go, said in the log.
  struct UnrecordedHistory {
    std::string job_id;
    std::optional<StepRecord> step;  // or:
    StoredEvent event;
    // Reported again by a resumed job (TrainingEvent::replayed): written only where the job has
    // no such row, which keeps the first one and its time.
    bool replayed = false;
    int64_t Step() const { return step ? step->step : event.step; }
  };
  static constexpr size_t kMaxUnrecordedHistory = 100000;
  std::deque<UnrecordedHistory> unrecorded_history_;
  // Records `entry` now unless older rows still wait (they go first); false: it waits.
  void RecordHistory(UnrecordedHistory entry);
  absl::Status Store(const UnrecordedHistory& entry);  // one row, now
  void RecordHistoryAgain();
  bool look_for_jobs_ = true;
  bool stop_ = false;
  bool starting_stopped_ = false;  // StopStartingJobs
  std::thread thread_;
  std::thread leftovers_;  // RemoveInBackground
  std::atomic<bool> stop_removing_{false};
};

}  // namespace lorad::server
