#include "server/job_runner.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/lora/peft_config.h"
#include "engine/model/utf8.h"
#include "engine/runtime/durable_file.h"
#include "engine/train/checkpoint_folders.h"
#include "server/job_spec_validator.h"
#include "server/path_policy.h"
#include "server/training_service.h"
#include "spdlog/spdlog.h"

namespace lorad::server {
namespace {

namespace fs = std::filesystem;
using engine::TrainingEvent;

lorad::v1::JobEvent EventFor(const std::string& job_id, int64_t ms) {
  lorad::v1::JobEvent e;
  e.set_job_id(job_id);
  e.mutable_time()->set_seconds(ms / 1000);
  e.mutable_time()->set_nanos(static_cast<int32_t>((ms % 1000) * 1000000));
  return e;
}

}  // namespace

JobRunner::JobRunner(engine::Engine& engine, JobStore& store, JobEventHub& events,
                     MetricsRegistry& metrics, std::string jobs_dir, std::string dataset_root,
                     int max_running)
    : engine_(engine),
      store_(store),
      events_(events),
      job_loss_(metrics.AddGauge("lorad_job_loss", "Training loss of the running job's last step",
                                 {"job_id", "adapter"})),
      job_lr_(metrics.AddGauge("lorad_job_learning_rate",
                               "Learning rate of the running job's last step",
                               {"job_id", "adapter"})),
      job_tokens_per_s_(metrics.AddGauge("lorad_job_tokens_per_second",
                                         "Training throughput of the running job's last step",
                                         {"job_id", "adapter"})),
      job_step_(metrics.AddGauge("lorad_job_step", "Optimizer steps the running job has completed",
                                 {"job_id", "adapter"})),
      trained_tokens_(
          metrics.AddCounter("lorad_train_tokens_total", "Tokens trained on, over all jobs")),
      jobs_dir_(std::move(jobs_dir)),
      dataset_root_(std::move(dataset_root)),
      max_running_(max_running) {}

JobRunner::~JobRunner() { Stop(); }

void JobRunner::Start() {
  thread_ = std::thread([this] { Loop(); });
}

void JobRunner::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  stop_removing_ = true;  // the rest goes at the next start
  if (leftovers_.joinable()) leftovers_.join();
}

void JobRunner::StopStartingJobs() {
  std::lock_guard<std::mutex> lock(mu_);
  starting_stopped_ = true;
}

void JobRunner::Wake() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    look_for_jobs_ = true;
  }
  wake_.notify_all();
}

std::string JobRunner::WaitingFor(const std::string& job_id, bool first_in_line) {
  std::lock_guard<std::mutex> lock(mu_);
  if (max_running_ == 0)
    return "training.max_running_jobs is 0: jobs stay queued until it is raised";
  if (static_cast<int>(running_.size()) >= max_running_) {
    return absl::StrCat("the ", running_.size(), " running job(s) fill training.max_running_jobs");
  }
  if (!storage_wait_.first.empty()) {
    return first_in_line && storage_wait_.first == job_id
               ? absl::StrCat("it cannot start: ", storage_wait_.second,
                              "; tried again every few seconds")
               : absl::StrCat(storage_wait_.first,
                              ", first in line, cannot start: ", storage_wait_.second);
  }
  if (!memory_wait_.first.empty()) {
    return first_in_line && memory_wait_.first == job_id
               ? absl::StrCat("it waits for training memory: it needs ", memory_wait_.second,
                              "; it starts when a running job ends")
               : absl::StrCat(memory_wait_.first,
                              ", first in line, waits for training memory (a job behind it "
                              "starts first only where it fits now and leaves it its room)");
  }
  return "";
}

void JobRunner::Cancel(const std::string& job_id) {
  // The store already says cancelled, and the caller publishes that next; the engine stops the
  // job at its next micro-batch (the cancelled state stays: MarkSucceeded/Failed refuse).
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::lock_guard<std::mutex> progress(progress_mu_);
    if (running_.count(job_id) > 0) cancelled_.insert(job_id);
    if (memory_wait_.first == job_id) memory_wait_ = {};  // the next in line is tried at Wake
    if (storage_wait_.first == job_id) storage_wait_ = {};
    memory_wait_logged_.erase(job_id);
  }
  engine_.CancelTraining(job_id);
  const std::map<std::string, std::string> unrecorded = store_.UnrecordedCancels();
  if (auto it = unrecorded.find(job_id); it != unrecorded.end()) {
    spdlog::error(
        "job {} cancelled, but the job database could not record that ({}); the job stops now "
        "and the cancel is recorded once the database takes writes again; a restart before "
        "that queues the job again: cancel it then",
        job_id, it->second);
  }
  Wake();
}

void JobRunner::Loop() {
  while (true) {
    std::deque<Pending> batch;
    bool look = false, exiting = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (start_again_at_ && std::chrono::steady_clock::now() >= *start_again_at_) {
        look_for_jobs_ = true;
        start_again_at_.reset();
      }
      // Looking is wanted only while there is room: a full (or held) runner must sleep, not spin.
      // (Nor one that starts no more jobs, for the shutdown.)
      const auto room = [&] {
        return static_cast<int>(running_.size()) < max_running_ && !starting_stopped_;
      };
      wake_.wait_for(lock, std::chrono::seconds(1),
                     [&] { return stop_ || !pending_.empty() || (look_for_jobs_ && room()); });
      batch.swap(pending_);
      look = look_for_jobs_ && room() && !stop_;
      if (look) look_for_jobs_ = false;
      exiting = stop_ && batch.empty();
    }
    RecordHistoryAgain();  // before this batch's (the history stays in order); at a stop, a last
                           // try
    RecordCancelsAgain();
    if (exiting) {
      for (const auto& [id, why] : store_.UnrecordedCancels()) {
        spdlog::warn(
            "job {}: its cancel is not in the job database (it refused writes until the stop); "
            "the job is queued again at the next start: cancel it then",
            id);
      }
      if (!unrecorded_history_.empty()) {
        spdlog::warn(
            "{} rows of the jobs' history are not in the job database: it refused writes "
            "until the stop",
            unrecorded_history_.size());
      }
      return;
    }
    for (const Pending& p : batch) Handle(p);
    RecordFailuresAgain();
    RecordSuccessesAgain();
    if (look) StartNextJob();
  }
}

absl::StatusOr<JobRecord> JobRunner::RetryJob(const std::string& job_id, int64_t max_queued) {
  std::unique_lock<std::mutex> folders(folders_mu_);
  auto current = store_.Get(job_id);
  if (!current.ok()) return current.status();
  // A job in another state than these is Requeue's to refuse.
  std::optional<int64_t> resume_step;
  if (current->state == JobState::kFailed || current->state == JobState::kCancelled) {
    {
      std::lock_guard<std::mutex> lock(mu_);  // ended, its trainer not yet stopped
      if (running_.count(job_id) > 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "job '", job_id,
            "' has ended but its trainer is still stopping (it may be writing a checkpoint); "
            "retry it once it has stopped, in a few seconds"));
      }
    }
    // A job with no checkpoint starts from the adapter it continues, whose folder may have gone
    // since it ended (the job that trained it deleted): refused now, not failed at its start.
    resume_step = ResumePoint(job_id).first;
    lorad::v1::JobSpec spec;
    if (*resume_step == 0 && spec.ParseFromString(current->spec)) {
      if (auto s = CheckInitAdapterUnchanged(spec); !s.ok()) return s;
    }
  }
  auto record = store_.Requeue(job_id, max_queued);
  if (!record.ok()) return record.status();
  if (record->attempts > 0) {
    ForgetHistoryAfter(job_id, resume_step ? *resume_step : ResumePoint(job_id).first);
  }
  spdlog::info("job {} ({}) queued again", job_id, record->adapter_name);
  events_.Publish(StateEvent(job_id, JobState::kQueued, JobTimeMs()));
  folders.unlock();
  Wake();
  return record;
}

void JobRunner::PublishKept(const std::string& job_id, int64_t step,
                            const lorad::v1::JobEvent& event, bool replayed) {
  // Kept with the job (WatchJob replays it), then published, unless a first run of a resumed
  // job reported it already (its watchers got it from the history). Replayed (reported again
  // from a checkpoint): a row already there is kept as it was, with its time.
  const StoredEvent stored{step, static_cast<int32_t>(event.event_case()),
                           event.SerializeAsString()};
  absl::StatusOr<bool> added = true;
  if (unrecorded_history_.empty()) {
    added =
        replayed ? store_.AppendEventIfMissing(job_id, stored) : store_.AppendEvent(job_id, stored);
  }
  if (!unrecorded_history_.empty() || !added.ok()) {
    RecordHistory({job_id, std::nullopt, stored, replayed});  // waits its turn, then is recorded
    added = !replayed;  // one reported again may be there already: watchers got it then
  }
  if (*added) events_.Publish(event);
}

std::pair<int64_t, std::string> NewestCheckpoint(const std::string& job_folder) {
  // A checkpoint a kill left aside while replacing it is the job's to resume from: put back
  // before the caller says where the job resumes and forgets the history after it.
  engine::RestoreReplacedFolders(job_folder);
  std::pair<int64_t, std::string> newest{0, ""};
  for (auto& [step, folder] : engine::CompleteCheckpoints(job_folder)) {
    if (newest.second.empty() || step > newest.first) newest = {step, folder.string()};
  }
  return newest;
}

std::pair<int64_t, std::string> JobRunner::ResumePoint(const std::string& job_id) const {
  return NewestCheckpoint((fs::path(jobs_dir_) / job_id).string());
}

void JobRunner::ForgetHistoryAfter(const std::string& job_id, int64_t step) {
  if (auto s = store_.ForgetHistoryAfter(job_id, step); !s.ok()) {
    spdlog::warn(
        "job {}: its history after step {}, where it resumed, could not be removed ({}): until "
        "the job gets past those steps again, its progress reads as the last run's",
        job_id, step, std::string(s.message()));
  }
}

void JobRunner::FailJob(const std::string& job_id, const std::string& raw_error) {
  // An error may quote what it read (a dataset's bytes, in the JSON parser's "last read: ...");
  // proto3 strings must be UTF-8, and a client's parser refuses a message that is not (one such
  // job made every ListJobs page unreadable in Python).
  const std::string error = engine::Utf8Lossy(raw_error);
  const int64_t now = JobTimeMs();
  const absl::Status stored = store_.MarkFailed(job_id, error, now);
  if (absl::IsFailedPrecondition(stored) || absl::IsNotFound(stored)) {  // cancelled meanwhile
    Wake();
    return;
  }
  if (stored.ok()) {
    spdlog::warn("job {} failed: {}", job_id, error);
  } else {
    spdlog::error("job {} failed: {}; the job database could not record that ({}); retrying",
                  job_id, error, std::string(stored.message()));
    unrecorded_failures_[job_id] = error;
  }
  // Watchers learn it now either way; the record follows once the store takes it.
  lorad::v1::JobEvent failed = EventFor(job_id, now);
  failed.set_failed(error);
  events_.Publish(failed);
  events_.Publish(StateEvent(job_id, JobState::kFailed, now));
  Wake();
}

absl::Status JobRunner::Store(const UnrecordedHistory& entry) {
  if (entry.replayed) {
    return entry.step ? store_.AppendStepIfMissing(entry.job_id, *entry.step).status()
                      : store_.AppendEventIfMissing(entry.job_id, entry.event).status();
  }
  return entry.step ? store_.AppendStep(entry.job_id, *entry.step)
                    : store_.AppendEvent(entry.job_id, entry.event).status();
}

void JobRunner::RecordHistory(UnrecordedHistory entry) {
  if (unrecorded_history_.empty()) {
    const absl::Status stored = Store(entry);
    if (stored.ok()) return;
    spdlog::warn("job {}: its history of step {} waits to be recorded: {}", entry.job_id,
                 entry.Step(), std::string(stored.message()));
  }
  if (unrecorded_history_.size() >= kMaxUnrecordedHistory) {
    const UnrecordedHistory& dropped = unrecorded_history_.front();
    spdlog::warn("job {}: step {}'s history is left out of the job database ({} rows waited)",
                 dropped.job_id, dropped.Step(), kMaxUnrecordedHistory);
    unrecorded_history_.pop_front();
  }
  unrecorded_history_.push_back(std::move(entry));
}

void JobRunner::RecordHistoryAgain() {
  bool recorded_any = false;
  while (!unrecorded_history_.empty()) {
    const UnrecordedHistory& entry = unrecorded_history_.front();
    const absl::Status stored = Store(entry);
    // A job deleted meanwhile has no history to keep.
    if (!stored.ok() && !absl::IsNotFound(store_.Get(entry.job_id).status())) break;
    recorded_any = recorded_any || stored.ok();
    unrecorded_history_.pop_front();
  }
  if (recorded_any && unrecorded_history_.empty()) {
    spdlog::info("the jobs' history that waited is recorded now");
  }
}

void JobRunner::RecordCancelsAgain() {
  const size_t waiting = store_.UnrecordedCancels().size();
  if (waiting == 0) return;
  if (auto recorded = store_.RecordCancels(); recorded.ok()) {
    spdlog::info("{} cancel(s) the job database refused are recorded now", waiting);
  }
}

void JobRunner::RecordFailuresAgain() {
  for (auto it = unrecorded_failures_.begin(); it != unrecorded_failures_.end();) {
    const absl::Status stored = store_.MarkFailed(it->first, it->second);
    if (stored.ok()) spdlog::info("job {}: its failure is recorded now", it->first);
    if (stored.ok() || absl::IsFailedPrecondition(stored) || absl::IsNotFound(stored)) {
      it = unrecorded_failures_.erase(it);
    } else {
      ++it;
    }
  }
}

void JobRunner::Handle(const Pending& p) {
  const TrainingEvent& e = p.event;
  const std::string& adapter = p.adapter;
  const LabelValues labels = {p.job_id, adapter};
  const int64_t now = JobTimeMs();
  lorad::v1::JobEvent out = EventFor(p.job_id, now);
  std::unique_lock<std::mutex> progress;
  if (e.kind != TrainingEvent::Kind::kFinished && e.kind != TrainingEvent::Kind::kFailed) {
    progress = std::unique_lock<std::mutex>(progress_mu_);  // until it is published
    if (cancelled_.count(p.job_id) > 0) return;             // progress after the published end
  }
  switch (e.kind) {
    case TrainingEvent::Kind::kStep: {
      StepRecord s;
      s.step = e.step.step;
      s.epoch = e.step.epoch;
      s.loss = e.step.loss;
      s.learning_rate = e.step.learning_rate;
      s.grad_norm = e.step.grad_norm;
      s.tokens_per_second = e.step.tokens_per_s;
      s.step_seconds = e.step.step_time_s;
      s.elapsed_seconds = e.step.elapsed_s;
      s.eta_seconds = e.step.eta_s;
      s.time_ms = now;
      if (e.replayed) {
        // A step before the checkpoint a resumed job starts from, reported again: recorded (and
        // sent to watchers) only where a process killed before recording it lost it. Progress
        // made earlier, so no metrics and no counted tokens.
        absl::StatusOr<bool> added = false;
        if (unrecorded_history_.empty()) added = store_.AppendStepIfMissing(p.job_id, s);
        if (!unrecorded_history_.empty() || !added.ok()) {
          RecordHistory({p.job_id, s, {}, /*replayed=*/true});
        } else if (*added) {
          *out.mutable_step() = ToProtoStep(s, e.step.total_steps);
          events_.Publish(out);
        }
        return;
      }
      // A resumed job re-reports the steps after its checkpoint: the row is replaced. One the
      // store refuses (a full disk) is still sent to watchers, and recorded once it can be.
      RecordHistory({p.job_id, s, {}});
      job_loss_.Set(labels, s.loss);
      job_lr_.Set(labels, s.learning_rate);
      job_tokens_per_s_.Set(labels, s.tokens_per_second);
      job_step_.Set(labels, static_cast<double>(s.step));
      trained_tokens_.Inc({}, static_cast<double>(e.step.tokens));
      if (auto [it, added] = job_total_steps_.try_emplace(p.job_id, -1);
          it->second != e.step.total_steps) {
        if (store_.SetTotalSteps(p.job_id, e.step.total_steps).ok()) {
          it->second = e.step.total_steps;
        }
      }
      *out.mutable_step() = ToProtoStep(s, e.step.total_steps);
      events_.Publish(out);
      return;
    }
    case TrainingEvent::Kind::kEval:
      out.mutable_eval()->set_step(e.eval.step);
      out.mutable_eval()->set_validation_loss(e.eval.loss);
      PublishKept(p.job_id, e.eval.step, out, e.replayed);
      return;
    case TrainingEvent::Kind::kCheckpoint:
      out.mutable_checkpoint()->set_step(e.checkpoint.step);
      out.mutable_checkpoint()->set_path(e.checkpoint.path);
      // Reported again: the checkpoint the job resumes from, and what came after it is gone.
      if (e.replayed) ForgetHistoryAfter(p.job_id, e.checkpoint.step);
      PublishKept(p.job_id, e.checkpoint.step, out, e.replayed);
      return;
    case TrainingEvent::Kind::kWarning: {
      const std::string warning = engine::Utf8Lossy(e.error);
      spdlog::warn("job {}: {}", p.job_id, warning);
      out.set_warning(warning);
      // Kept with the job, the latest one per step (a write retried every minute on a full disk
      // replaces its own; on a full disk recorded once it can be), and always published.
      RecordHistory(
          {p.job_id,
           std::nullopt,
           {e.step.step, static_cast<int32_t>(out.event_case()), out.SerializeAsString()}});
      events_.Publish(out);
      return;
    }
    case TrainingEvent::Kind::kFinished:
    case TrainingEvent::Kind::kFailed:
      break;
  }
  // The job ended.
  {
    std::lock_guard<std::mutex> lock(mu_);
    running_.erase(p.job_id);
    look_for_jobs_ = true;
  }
  {
    std::lock_guard<std::mutex> lock(progress_mu_);
    cancelled_.erase(p.job_id);
  }
  for (GaugeFamily* g : {&job_loss_, &job_lr_, &job_tokens_per_s_, &job_step_}) g->Remove(labels);
  job_total_steps_.erase(p.job_id);
  if (e.kind == TrainingEvent::Kind::kFailed) {
    FailJob(p.job_id, e.error);
    return;
  }
  if (e.summary.cancelled) {  // CancelJob already stored and published the state
    // ... unless the engine stopped it for the daemon's shutdown: then it is still running.
    auto record = store_.Get(p.job_id);
    if (record.ok() && record->state == JobState::kRunning) {
      spdlog::info("job {} stopped after {} steps for the shutdown; it resumes at the next start",
                   p.job_id, e.summary.steps);
    } else {
      spdlog::info("job {} cancelled after {} steps", p.job_id, e.summary.steps);
    }
    return;
  }
  Succeed(p);
}

void JobRunner::Succeed(const Pending& p) {
  const engine::TrainingSummary& summary = p.event.summary;
  const std::string& adapter = p.adapter;
  // Cancelled after training ended but before this: publish nothing. From here on a cancel
  // leaves the job to succeed or fail.
  if (!store_.BeginPublishing(p.job_id).ok()) {
    spdlog::info("job {} was cancelled as it finished; its adapter is not published", p.job_id);
    unrecorded_successes_.erase(p.job_id);  // nothing left to record
    return;
  }
  const int64_t now = JobTimeMs();
  lorad::v1::JobEvent out = EventFor(p.job_id, now);
  // The job is recorded as succeeded, with its adapter as served, before the new version serves
  // (LoadPeft's hook): a record the store refuses (a full disk) publishes nothing, and is tried
  // again (RecordSuccessesAgain) rather than leave a served adapter's job running for ever.
  bool hook_ran = false;
  absl::Status recorded;
  // What the folder holds, recorded with it: a restart serves this version again only from the
  // same files, as an adapter loaded by hand.
  const std::string fingerprint = engine::PeftFolderFingerprint(summary.adapter_path).value_or("");
  auto record = [&](int64_t version) {
    hook_ran = true;
    auto* s = out.mutable_finished();
    s->set_runtime_seconds(summary.runtime_s);
    s->set_final_loss(summary.final_loss);
    s->set_train_loss(summary.train_loss);
    if (summary.best_is_eval) s->set_best_validation_loss(summary.best_loss);
    s->set_steps(summary.steps);
    s->set_merged_model_path(summary.merged_path);
    s->set_merged_model_error(engine::Utf8Lossy(summary.merged_error));
    if (summary.has_eval_report) {
      s->set_rouge1(summary.rouge.rouge1);
      s->set_rouge2(summary.rouge.rouge2);
      s->set_rouge_l(summary.rouge.rouge_l);
      s->set_eval_report_path(summary.eval_report_path);
    }
    s->set_trained_tokens(summary.trained_tokens);  // over every run of a resumed job
    s->set_adapter_name(adapter);
    s->set_adapter_version(version);
    s->set_skipped_lines(summary.skipped_records);
    s->set_first_skipped(engine::Utf8Lossy(summary.first_skipped));
    s->set_dropped_examples(summary.dropped_examples);
    s->set_truncated_examples(summary.truncated_examples);
    s->set_adapter_path(summary.adapter_path);
    s->set_adapter_step(summary.adapter_step);
    s->set_early_stopped(summary.early_stopped);
    s->set_answered_examples(summary.answered);
    // The summary is stored with the state change (GetJob and a later WatchJob return it).
    recorded = store_.MarkSucceeded(
        p.job_id, version,
        {summary.steps, lorad::v1::JobEvent::kFinishedFieldNumber, out.SerializeAsString()},
        {adapter, version, summary.adapter_path, "job:" + p.job_id, /*served=*/true, fingerprint,
         /*base_fingerprint=*/""},
        now);
    return recorded;
  };
  auto version = engine_.adapters().LoadPeft(adapter, summary.adapter_path, "job:" + p.job_id,
                                             nullptr, record);
  if (!version.ok() && hook_ran) {
    if (absl::IsFailedPrecondition(recorded) || absl::IsNotFound(recorded)) {
      return;  // cancelled meanwhile (after a record that failed): CancelJob published that
    }
    if (unrecorded_successes_.count(p.job_id) == 0) {
      spdlog::error(
          "job {} finished, but the job database could not record it ({}); its adapter serves "
          "once it does; retrying",
          p.job_id, std::string(recorded.message()));
    }
    unrecorded_successes_[p.job_id] = {p, std::chrono::steady_clock::now()};
    return;
  }
  unrecorded_successes_.erase(p.job_id);
  if (!version.ok()) {
    FailJob(p.job_id, absl::StrCat("publishing the adapter '", adapter, "' from ",
                                   summary.adapter_path, " failed: ", version.status().message()));
    return;
  }
  events_.Publish(out);
  events_.Publish(StateEvent(p.job_id, JobState::kSucceeded, now));
  spdlog::info("job {} succeeded: {} steps in {:.1f} s, final loss {:.4f}; adapter {} version {}",
               p.job_id, summary.steps, summary.runtime_s, summary.final_loss, adapter, *version);
}

void JobRunner::RecordSuccessesAgain() {
  // Every few seconds, not every turn: each try reads the adapter folder again.
  constexpr auto kRetryEvery = std::chrono::seconds(5);
  std::vector<Pending> due;
  for (const auto& [id, unrecorded] : unrecorded_successes_) {
    if (std::chrono::steady_clock::now() - unrecorded.last_try >= kRetryEvery) {
      due.push_back(unrecorded.pending);
    }
  }
  for (const Pending& p : due) {
    Succeed(p);
    if (unrecorded_successes_.count(p.job_id) == 0) {
      spdlog::info("job {}: its success is recorded now", p.job_id);
    }
  }
}

int64_t MakeJobExamplesPrivate(const std::string& jobs_dir) {
  int64_t changed = 0;
  std::error_code ec;
  for (const auto& job : fs::directory_iterator(jobs_dir, ec)) {
    for (const char* name : {"inline_dataset.jsonl", "eval_report.json"}) {
      const fs::path file = job.path() / name;
      const fs::file_status status = fs::symlink_status(file, ec);
      if (ec || !fs::is_regular_file(status)) continue;
      if ((status.permissions() & (fs::perms::group_all | fs::perms::others_all)) ==
          fs::perms::none) {
        continue;
      }
      fs::permissions(file, fs::perms::owner_read | fs::perms::owner_write, ec);
      changed += ec ? 0 : 1;
    }
  }
  return changed;
}

}  // namespace lorad::server
