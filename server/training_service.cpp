#include "server/training_service.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <openssl/evp.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <deque>
#include <mutex>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "engine/model/utf8.h"
#include "server/call_authorizer.h"
#include "server/grpc_status.h"
#include "spdlog/spdlog.h"

namespace lorad::server {
namespace {

using lorad::v1::JobEvent;

void SetTime(google::protobuf::Timestamp* ts, int64_t ms) {
  ts->set_seconds(ms / 1000);
  ts->set_nanos(static_cast<int32_t>((ms % 1000) * 1000000));
}

absl::Status RequireJobId(const std::string& id) {
  if (id.empty()) return absl::InvalidArgumentError("job_id: is empty");
  // Ids are "job-" and 16 hex digits; a long one is not echoed back (error details travel in
  // gRPC metadata, which has a size limit).
  if (id.size() > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("job_id: ", id.size(), " characters; job ids look like job-0123456789abcdef"));
  }
  return absl::OkStatus();
}

absl::Status CheckRequestId(const std::string& id) {
  constexpr size_t kMaxLength = 128;
  if (id.size() > kMaxLength) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id: ", id.size(), " characters; at most ", kMaxLength));
  }
  for (const char c : id) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' ||
          c == '-')) {
      return absl::InvalidArgumentError(
          "request_id: only letters, digits and . _ : - may be used (e.g. a UUID)");
    }
  }
  return absl::OkStatus();
}

// SHA-256 of the spec's deterministic encoding, in hex: a request_id sent again with the same
// spec is the same submission.
std::string SpecDigest(const lorad::v1::JobSpec& spec) {
  std::string bytes;
  {
    google::protobuf::io::StringOutputStream stream(&bytes);
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    spec.SerializeToCodedStream(&coded);
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_Digest(bytes.data(), bytes.size(), digest, &length, EVP_sha256(), nullptr) != 1) {
    return bytes;  // no digest: the encoding itself compares the same way
  }
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(digest), length));
}

// One WatchJob stream: history first (read a page of steps at a time), then live events, one
// write in flight at a time. The reactor subscribes before reading history so no event falls
// between the two; live events the history already holds (HistoryHolds) are dropped, so none is
// sent twice.
class WatchJobReactor : public grpc::ServerWriteReactor<JobEvent> {
 public:
  // `slot`: this stream's place among the open ones (none when it is refused for want of one).
  WatchJobReactor(JobStore& store, JobEventHub& events, const lorad::v1::WatchJobRequest& request,
                  const absl::Status& authorized, std::chrono::steady_clock::time_point deadline,
                  std::optional<OpenCalls::Slot> slot)
      : store_(store), events_(events), deadline_(deadline), slot_(std::move(slot)) {
    if (!authorized.ok()) {
      Finish(ToGrpcStatus(authorized));
      return;
    }
    if (auto s = RequireJobId(request.job_id()); !s.ok()) {
      Finish(ToGrpcStatus(s));
      return;
    }
    if (request.from_step() < 0) {
      Finish(ToGrpcStatus(absl::InvalidArgumentError(
          absl::StrCat("from_step: ", request.from_step(), " is negative; 0 replays every step"))));
      return;
    }
    // Before the subscription: a live event that arrives as it is taken must meet from_step too
    // (a step below it reached the client before step from_step now and then).
    from_step_ = request.from_step();
    next_step_ = request.from_step();
    stored_from_ = request.from_step();
    const absl::Status stopping =
        absl::UnavailableError("lorad is stopping; watch the job again once it is back");
    subscription_ = events_.Subscribe(
        request.job_id(), [this](const JobEvent& e) { Enqueue(e, /*live=*/true); },
        [this, stopping] { FinishNow(stopping); });
    if (subscription_ == 0) {
      Finish(ToGrpcStatus(stopping));
      return;
    }
    auto record = store.Get(request.job_id());
    if (!record.ok()) {
      FinishNow(record.status());
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    record_ = *std::move(record);
    queue_.push_back(StateEvent(record_.id, JobState::kQueued, record_.created_ms));
    if (record_.started_ms > 0) {
      queue_.push_back(StateEvent(record_.id, JobState::kRunning, record_.started_ms));
    }
    history_.last_state =
        ToProtoState(record_.started_ms > 0 ? JobState::kRunning : JobState::kQueued);
    if (auto s = LoadStepsLocked(); !s.ok()) {
      FinishLocked(ToGrpcStatus(s));
      return;
    }
    WriteNextLocked();
  }
  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {
      FinishLocked(grpc::Status::CANCELLED);
      return;
    }
    WriteNextLocked();
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    FinishLocked(CancelledCallStatus(deadline_));
  }

  void OnDone() override {
    Unsubscribe();
    delete this;
  }

 private:
  static bool IsEnd(const JobEvent& e) {
    return e.has_state() && (e.state() == lorad::v1::JOB_STATE_SUCCEEDED ||
                             e.state() == lorad::v1::JOB_STATE_FAILED ||
                             e.state() == lorad::v1::JOB_STATE_CANCELLED);
  }

  // The step a step, evaluation or checkpoint event belongs to; -1 for other events.
  static int64_t StepOf(const JobEvent& e) {
    if (e.has_step()) return e.step().step();
    if (e.has_eval()) return e.eval().step();
    if (e.has_checkpoint()) return e.checkpoint().step();
    return -1;
  }

  void Enqueue(const JobEvent& e, bool live) {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return;
    // from_step holds for live events too (a job resumed from a checkpoint reports again the
    // steps after it).
    if (StepOf(e) >= 0 && StepOf(e) < from_step_) return;
    // A watcher that stopped reading: steps past kMaxQueued are dropped below, but evaluations,
    // checkpoints and warnings were kept without bound (a stalled watcher grew by megabytes a
    // minute and slowed the job's event handling). Past kMaxBehind events it is ended.
    if (live_.size() + queue_.size() >= kMaxBehind) {
      FinishLocked(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                "this watch fell too far behind the job's events (the client "
                                "did not read them); watch again, with from_step to go on"));
      return;
    }
    if (!history_loaded_) {
      // Kept until the history is read, steps too: a step is stored before it is published, so
      // the pages still to read normally hold it (HistoryHolds then drops this copy), but one the
      // job database refused (a full disk) is published first and recorded once it can be, and
      // this copy is all the watcher gets. Past kMaxQueued waiting steps later ones are dropped
      // (what a long replay holds stays bounded; the history has them once recorded).
      if (e.has_step() && std::count_if(live_.begin(), live_.end(), [](const JobEvent& l) {
                            return l.has_step();
                          }) >= static_cast<std::ptrdiff_t>(kMaxQueued)) {
        return;
      }
      live_.push_back(e);
      return;
    }
    // The end was queued: the stream sends nothing after it (a failed job publishes its error
    // and its state after storing both, so the history may hold them already).
    if (closed_) return;
    // Published after the history read them (the store is written first).
    if (live && HistoryHolds(history_, e)) return;
    if (e.has_state()) history_.last_state = e.state();
    if (IsEnd(e)) closed_ = true;
    // A watcher that cannot keep up loses intermediate steps (they stay in the job's history)
    // rather than holding memory without bound.
    if (queue_.size() >= kMaxQueued && e.has_step()) return;
    queue_.push_back(e);
    WriteNextLocked();
  }

  // The history is sent a page of steps at a time (a long job has hundreds of thousands, too
  // many to hold for every watcher): the next page is read once the queue has run dry.
  static constexpr int64_t kStepsPerPage = 1000;

  // Queues the next page of steps, each after the stored events (evaluations, checkpoints) of
  // the steps before it; after the last page, the rest of the history (FinishHistoryLocked).
  // Stored events are read a page at a time too, after the page's steps: one read at the start
  // held gRPC's thread for seconds on a long job evaluated often, and each watcher held them all.
  // An event stored after its range was read was published after the subscription, so it is
  // among the live ones.
  absl::Status LoadStepsLocked() {
    auto steps = store_.Steps(record_.id, next_step_, kStepsPerPage);
    if (!steps.ok()) return steps.status();
    const bool last_page = static_cast<int64_t>(steps->size()) < kStepsPerPage;
    if (auto s = LoadStoredThroughLocked(last_page ? INT64_MAX : steps->back().step - 1); !s.ok()) {
      return s;
    }
    for (const auto& s : *steps) {
      QueueStoredThroughLocked(s.step - 1);
      QueueLiveThroughLocked(s.step - 1);
      JobEvent e;
      e.set_job_id(record_.id);
      if (s.time_ms > 0) SetTime(e.mutable_time(), s.time_ms);
      // The job's total when the watch began: the trainer's own once it has run a step (the
      // runner records it with the first step it publishes), so a replay equals the live events.
      *e.mutable_step() = ToProtoStep(s, record_.total_steps);
      queue_.push_back(std::move(e));
      history_.last_step = s.step;
      last_step_ms_ = s.time_ms;
      next_step_ = s.step + 1;
    }
    if (last_page) {
      // Deleted (DeleteJob) since the stream began: what was read may be cut short, so the
      // stream ends NOT_FOUND rather than with the job's end state.
      if (IsTerminal(record_.state)) {
        if (auto now = store_.Get(record_.id); absl::IsNotFound(now.status())) {
          return now.status();
        }
      }
      FinishHistoryLocked();
    }
    return absl::OkStatus();
  }

  // Evaluations and checkpoints published while the history is read go after their own step,
  // not after the history's last page (steps come from the pages: the store has them first).
  void QueueLiveThroughLocked(int64_t step) {
    for (auto it = live_.begin(); it != live_.end();) {
      const int64_t of = StepOf(*it);
      if (of < 0 || of > step) {
        ++it;
        continue;
      }
      if (!HistoryHolds(history_, *it)) queue_.push_back(std::move(*it));
      it = live_.erase(it);
    }
  }

  // Reads the stored events after those read so far, through `step`, from from_step on (earlier
  // steps' evaluations and checkpoints are not sent; the summary always is).
  absl::Status LoadStoredThroughLocked(int64_t step) {
    if (step < stored_from_) return absl::OkStatus();
    auto stored = store_.Events(record_.id, stored_from_, step);
    if (!stored.ok()) return stored.status();
    stored_.erase(stored_.begin(), stored_.begin() + static_cast<std::ptrdiff_t>(next_stored_));
    next_stored_ = 0;
    for (auto& e : *stored) stored_.push_back(std::move(e));
    if (step == INT64_MAX && from_step_ > 0) {
      // The summary is sent whatever from_step is: one stored at an earlier step (a watch from
      // past the job's last step) was not among those read.
      auto summary = store_.LastEvent(record_.id, JobEvent::kFinishedFieldNumber);
      if (!summary.ok()) return summary.status();
      if (summary->has_value() && (*summary)->step < from_step_) {
        stored_.push_back(**std::move(summary));
      }
    }
    stored_from_ = step == INT64_MAX ? step : step + 1;
    return absl::OkStatus();
  }

  void QueueStoredThroughLocked(int64_t step) {
    for (; next_stored_ < stored_.size() && stored_[next_stored_].step <= step; ++next_stored_) {
      JobEvent e;
      if (!e.ParseFromString(stored_[next_stored_].event)) continue;  // unreadable: not replayed
      history_.stored.insert(std::hash<std::string>{}(stored_[next_stored_].event));
      queue_.push_back(std::move(e));
    }
  }

  // After the last step: the remaining stored events, the end of a job that had ended when the
  // stream began, then what arrived live meanwhile and the history does not hold.
  void FinishHistoryLocked() {
    QueueStoredThroughLocked(INT64_MAX);
    stored_.clear();
    if (record_.state == JobState::kQueued && record_.started_ms > 0) {
      // Started, then queued again by a restart (it resumes when its turn comes): the history
      // ends queued, so the RUNNING of its next start is sent too.
      queue_.push_back(
          StateEvent(record_.id, JobState::kQueued, std::max(record_.started_ms, last_step_ms_)));
      history_.last_state = lorad::v1::JOB_STATE_QUEUED;
    }
    if (IsTerminal(record_.state)) {
      JobEvent end = StateEvent(record_.id, record_.state, record_.finished_ms);
      if (record_.state == JobState::kFailed) {
        JobEvent failed;
        failed.set_job_id(record_.id);
        SetTime(failed.mutable_time(), record_.finished_ms);
        failed.set_failed(engine::Utf8Lossy(record_.error));  // rows of older lorad versions
        queue_.push_back(failed);
      }
      queue_.push_back(end);
      history_.last_state = end.state();
      live_.clear();  // the job is over: nothing live can follow
      closed_ = true;
    }
    for (auto& e : live_) {
      if (closed_) break;
      if (HistoryHolds(history_, e)) continue;
      if (e.has_state()) history_.last_state = e.state();
      if (e.has_step()) history_.last_step = e.step().step();
      if (IsEnd(e)) closed_ = true;
      queue_.push_back(std::move(e));
    }
    live_.clear();
    history_loaded_ = true;
  }

  void WriteNextLocked() {
    if (writing_ || finished_) return;
    if (queue_.empty() && !history_loaded_) {
      if (auto s = LoadStepsLocked(); !s.ok()) {
        FinishLocked(ToGrpcStatus(s));
        return;
      }
    }
    if (queue_.empty()) {
      if (ended_) FinishLocked(grpc::Status::OK);
      return;
    }
    current_ = std::move(queue_.front());
    queue_.pop_front();
    if (IsEnd(current_)) ended_ = true;
    writing_ = true;
    StartWrite(&current_);
  }

  void FinishNow(const absl::Status& status) {
    std::lock_guard<std::mutex> lock(mu_);
    FinishLocked(ToGrpcStatus(status));
  }

  void FinishLocked(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  void Unsubscribe() {
    if (subscription_ != 0) events_.Unsubscribe(subscription_);
    subscription_ = 0;
  }

  static constexpr size_t kMaxQueued = 10000;
  static constexpr size_t kMaxBehind = 2 * kMaxQueued;  // events of every kind, waiting
  JobStore& store_;
  JobEventHub& events_;
  const std::chrono::steady_clock::time_point deadline_;  // the call's; max() when none
  std::optional<OpenCalls::Slot> slot_;
  int64_t subscription_ = 0;
  std::mutex mu_;
  std::deque<JobEvent> queue_;
  std::deque<JobEvent> live_;        // events that arrived while history was read
  JobRecord record_;                 // the job as the stream began
  std::vector<StoredEvent> stored_;  // its stored events not yet queued, from next_stored_ on
  size_t next_stored_ = 0;
  int64_t stored_from_ = 0;   // the first step whose stored events are still to read
  int64_t next_step_ = 0;     // the first step of the history's next page
  int64_t from_step_ = 0;     // the request's: earlier steps are not sent, live or replayed
  int64_t last_step_ms_ = 0;  // the time of the history's last step
  JobEvent current_;          // the event being written (must outlive StartWrite)
  WatchHistory history_;      // what the history sent first holds
  bool history_loaded_ = false;
  bool closed_ = false;  // the end state is queued: nothing may follow it
  bool writing_ = false;
  bool ended_ = false;
  bool finished_ = false;
};

}  // namespace

lorad::v1::JobState ToProtoState(JobState state) {
  return static_cast<lorad::v1::JobState>(static_cast<int>(state));
}

lorad::v1::StepMetrics ToProtoStep(const StepRecord& s, int64_t total_steps) {
  lorad::v1::StepMetrics m;
  m.set_total_steps(total_steps);
  m.set_step(s.step);
  m.set_epoch(s.epoch);
  m.set_loss(s.loss);
  m.set_learning_rate(s.learning_rate);
  m.set_grad_norm(s.grad_norm);
  m.set_tokens_per_second(s.tokens_per_second);
  m.set_step_seconds(s.step_seconds);
  m.set_elapsed_seconds(s.elapsed_seconds);
  m.set_eta_seconds(s.eta_seconds);
  return m;
}

JobEvent StateEvent(const std::string& job_id, JobState state, int64_t time_ms) {
  JobEvent e;
  e.set_job_id(job_id);
  e.set_state(ToProtoState(state));
  SetTime(e.mutable_time(), time_ms);
  return e;
}

TrainingService::TrainingService(JobStore& store, JobEventHub& events,
                                 TrainingServiceOptions options)
    : store_(store),
      events_(events),
      options_(std::move(options)),
      open_watches_(options_.max_watches) {}

absl::Status TrainingService::FillReply(const JobRecord& record, lorad::v1::Job* job,
                                        const std::map<std::string, int64_t>* queue_order) {
  if (auto s = FillJob(record, job, queue_order); !s.ok()) return s;
  job->mutable_spec()->mutable_dataset()->clear_inline_examples();
  return absl::OkStatus();
}

absl::Status TrainingService::FillJob(const JobRecord& r, lorad::v1::Job* job,
                                      const std::map<std::string, int64_t>* queue_order) {
  job->set_id(r.id);
  if (!job->mutable_spec()->ParseFromString(r.spec)) {
    return absl::DataLossError(absl::StrCat("job '", r.id, "': stored spec is unreadable"));
  }
  job->mutable_spec()->DiscardUnknownFields();  // jobs stored before SubmitJob dropped them
  job->set_state(ToProtoState(r.state));
  SetTime(job->mutable_created(), r.created_ms);
  if (r.started_ms > 0) SetTime(job->mutable_started(), r.started_ms);
  if (r.finished_ms > 0) SetTime(job->mutable_finished(), r.finished_ms);
  job->set_error(engine::Utf8Lossy(r.error));  // rows of older lorad versions
  job->set_total_steps(r.total_steps);
  auto last = store_.LastStep(r.id);
  if (last.ok() && last->has_value()) {
    *job->mutable_last_step() = ToProtoStep(**last, r.total_steps);
    if ((*last)->time_ms > 0) {
      SetTime(job->mutable_last_step_time(), (*last)->time_ms);
      const int64_t now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                 std::chrono::system_clock::now().time_since_epoch())
                                 .count();
      job->set_last_step_age_seconds(
          static_cast<double>(std::max<int64_t>(0, now_ms - (*last)->time_ms)) / 1000.0);
    }
  }
  if (r.state == JobState::kQueued) {
    absl::StatusOr<std::map<std::string, int64_t>> read;
    if (queue_order == nullptr) {
      read = store_.QueueOrder();
      if (read.ok()) queue_order = &*read;
    }
    int64_t ahead = 0;
    if (queue_order != nullptr) {
      const auto it = queue_order->find(r.id);
      if (it != queue_order->end()) ahead = it->second;
    }
    const std::string why = options_.waiting_for ? options_.waiting_for(r.id, ahead == 0) : "";
    if (ahead > 0) {
      job->set_waiting_for(
          absl::StrCat(ahead, " queued job(s) start before it", why.empty() ? "" : "; ", why));
    } else {
      job->set_waiting_for(why.empty() ? "nothing: it starts next" : why);
    }
  }
  if (r.state == JobState::kSucceeded) {
    // The summary stored with the state change (none for a job that succeeded before lorad kept
    // them: then only the adapter is known).
    auto stored = store_.LastEvent(r.id, JobEvent::kFinishedFieldNumber);
    JobEvent finished;
    if (stored.ok() && stored->has_value() && finished.ParseFromString((*stored)->event)) {
      *job->mutable_summary() = finished.finished();
    }
    job->mutable_summary()->set_adapter_name(r.adapter_name);
    job->mutable_summary()->set_adapter_version(r.adapter_version);
  }
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* TrainingService::SubmitJob(grpc::CallbackServerContext* context,
                                                     const lorad::v1::SubmitJobRequest* request,
                                                     lorad::v1::Job* response) {
  if (auto s =
          Authorize(context, Role::kAdmin,
                    absl::StrCat("SubmitJob (adapter '", request->spec().adapter_name(), "')"));
      !s.ok())
    return FinishUnary(context, s);
  lorad::v1::JobSpec spec = request->spec();
  // Fields this lorad does not know are not stored: they served nothing, and a client could
  // make every listing of jobs megabytes with them.
  spec.DiscardUnknownFields();
  std::optional<JobStore::Submission> submission;
  if (!request->request_id().empty()) {
    if (auto s = CheckRequestId(request->request_id()); !s.ok()) return FinishUnary(context, s);
    submission = JobStore::Submission{request->request_id(), SpecDigest(spec)};
  }
  // Sent again: the job the first one queued, at once (a lookup), not behind other submissions'
  // dataset counts.
  if (submission) {
    if (auto again = Resubmitted(*submission, response)) return FinishUnary(context, *again);
  }
  // Counting a large dataset's records takes seconds to minutes: not on gRPC's threads, and a
  // job on inline examples alone does not wait behind those counts.
  // (Continuing an adapter fingerprints its weights file: a read too.)
  const bool reads_files = !spec.dataset().path().empty() ||
                           !spec.dataset().validation_path().empty() ||
                           !spec.init_adapter().empty();
  BlockingCalls* calls =
      reads_files || options_.file_free == nullptr ? options_.blocking : options_.file_free;
  if (calls == nullptr) return FinishUnary(context, Submit(spec, submission, nullptr, response));
  return calls->Run(context, [this, spec = std::move(spec), submission,
                              response](const std::atomic<bool>& give_up) mutable {
    return Submit(spec, submission, &give_up, response);
  });
}

std::optional<absl::Status> TrainingService::Resubmitted(const JobStore::Submission& submission,
                                                         lorad::v1::Job* response) {
  auto found = store_.FindSubmission(submission.request_id);
  if (!found.ok()) return found.status();
  if (!found->has_value()) return std::nullopt;
  const auto& [record, digest] = **found;
  if (digest != submission.digest) {
    return absl::AlreadyExistsError(absl::StrCat(
        "request_id '", submission.request_id, "' queued job '", record.id, "' (adapter '",
        record.adapter_name, "') with another spec; a new job needs a new request_id (or none)"));
  }
  return FillReply(record, response);
}

absl::Status TrainingService::Submit(lorad::v1::JobSpec& spec,
                                     const std::optional<JobStore::Submission>& submission,
                                     const std::atomic<bool>* abandon, lorad::v1::Job* response) {
  // Sent again: the job the first one queued, without reading its dataset again.
  if (submission) {
    if (auto again = Resubmitted(*submission, response)) return *again;
  }
  // The adapter a job continues sets its LoRA settings, which the rest checks.
  std::vector<ServedAdapter> served;
  if (!spec.init_adapter().empty()) {
    auto adapters = store_.ServedAdapters(spec.init_adapter());
    if (!adapters.ok()) return adapters.status();
    served = *std::move(adapters);
  }
  if (auto s = ResolveInitAdapter(spec, served); !s.ok()) return s;
  auto dataset = ValidateJobSpec(spec, options_.spec_limits, abandon);
  if (!dataset.ok()) return dataset.status();
  if (options_.check_job) {
    if (auto s = options_.check_job(spec, abandon); !s.ok()) return s;
  }
  // The client gave up while its dataset was counted: it saw the call fail, and a job queued
  // anyway would train twice when it sends the call again.
  if (abandon != nullptr && abandon->load()) {
    return absl::CancelledError(
        "the call ended (the client cancelled or its deadline passed) before the job was queued; "
        "nothing was submitted");
  }
  std::optional<std::string> listed;  // what ListJobs reads of it: no inline examples
  if (spec.dataset().inline_examples_size() > 0) {
    lorad::v1::JobSpec without = spec;
    without.mutable_dataset()->clear_inline_examples();
    listed = without.SerializeAsString();
  }
  // The adapter it continues was found served before the dataset check, which takes a while:
  // its folder may have gone since (its job deleted). Checked again, and held until the job is
  // recorded (DeleteJob then sees a queued job reading it).
  std::unique_lock<std::mutex> folders;
  if (!spec.init_adapter_path().empty()) {
    if (options_.hold_job_folders) folders = options_.hold_job_folders();
    if (auto s = CheckInitAdapterUnchanged(spec); !s.ok()) return s;
  }
  auto record = store_.Insert(spec.SerializeAsString(), spec.adapter_name(), spec.priority(),
                              TotalSteps(spec, dataset->examples), options_.max_queued_jobs, listed,
                              submission);
  // The same request_id queued a job meanwhile (two retries at once).
  if (absl::IsAlreadyExists(record.status()) && submission) {
    if (auto again = Resubmitted(*submission, response)) return *again;
  }
  if (!record.ok()) return record.status();
  events_.Publish(StateEvent(record->id, JobState::kQueued, record->created_ms));
  spdlog::info("job {} ({}) queued: {} step(s) on {}", record->id, record->adapter_name,
               record->total_steps,
               spec.dataset().path().empty()
                   ? absl::StrCat(spec.dataset().inline_examples_size(), " inline example(s)")
                   : spec.dataset().path());
  if (options_.on_submit) options_.on_submit();
  return FillReply(*record, response);
}

grpc::ServerUnaryReactor* TrainingService::GetJob(grpc::CallbackServerContext* context,
                                                  const lorad::v1::GetJobRequest* request,
                                                  lorad::v1::Job* response) {
  if (auto s = Authorize(context, Role::kUser); !s.ok()) return FinishUnary(context, s);
  if (auto s = RequireJobId(request->job_id()); !s.ok()) return FinishUnary(context, s);
  auto record = store_.Get(request->job_id());
  if (!record.ok()) return FinishUnary(context, record.status());
  return FinishUnary(context, FillJob(*record, response));
}

grpc::ServerUnaryReactor* TrainingService::ListJobs(grpc::CallbackServerContext* context,
                                                    const lorad::v1::ListJobsRequest* request,
                                                    lorad::v1::ListJobsResponse* response) {
  if (auto s = Authorize(context, Role::kUser); !s.ok()) return FinishUnary(context, s);
  std::vector<JobState> states;
  for (int s : request->states()) {
    if (s < 1 || s > 5) {
      return FinishUnary(
          context, absl::InvalidArgumentError(absl::StrCat("states: ", s, " is not a job state")));
    }
    states.push_back(static_cast<JobState>(s));
  }
  // Unset: 50; more than 500 is 500 (AIP-158: capped, not refused); negative is refused.
  const int32_t page_size =
      request->page_size() == 0 ? 50 : std::min<int32_t>(request->page_size(), 500);
  auto page = store_.List(states, page_size, request->page_token());
  if (!page.ok()) return FinishUnary(context, page.status());
  // The queue's order read once for the page (a query per queued job made a page of 500 take
  // 0.75 s with 20,000 queued).
  std::optional<std::map<std::string, int64_t>> queue_order;
  for (const auto& record : page->jobs) {
    if (record.state == JobState::kQueued && !queue_order) {
      auto read = store_.QueueOrder();
      if (!read.ok()) return FinishUnary(context, read.status());
      queue_order = *std::move(read);
    }
    if (auto s = FillReply(record, response->add_jobs(), queue_order ? &*queue_order : nullptr);
        !s.ok()) {
      return FinishUnary(context, s);
    }
  }
  response->set_next_page_token(page->next_page_token);
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* TrainingService::CancelJob(grpc::CallbackServerContext* context,
                                                     const lorad::v1::CancelJobRequest* request,
                                                     lorad::v1::Job* response) {
  if (auto s = Authorize(context, Role::kAdmin, "CancelJob " + request->job_id()); !s.ok())
    return FinishUnary(context, s);
  if (auto s = RequireJobId(request->job_id()); !s.ok()) return FinishUnary(context, s);
  auto before = store_.Get(request->job_id());
  if (!before.ok()) return FinishUnary(context, before.status());
  auto record = store_.Cancel(request->job_id());
  if (!record.ok()) return FinishUnary(context, record.status());
  if (!IsTerminal(before->state) && record->state == JobState::kCancelled) {
    if (options_.on_cancel) options_.on_cancel(record->id);
    spdlog::info("job {} ({}) cancelled{}", record->id, record->adapter_name,
                 before->state == JobState::kRunning ? " while running" : "");
    events_.Publish(StateEvent(record->id, JobState::kCancelled, record->finished_ms));
  }
  return FinishUnary(context, FillReply(*record, response));
}

grpc::ServerUnaryReactor* TrainingService::DeleteJob(grpc::CallbackServerContext* context,
                                                     const lorad::v1::DeleteJobRequest* request,
                                                     lorad::v1::DeleteJobResponse* /*response*/) {
  if (auto s = Authorize(context, Role::kAdmin, "DeleteJob " + request->job_id()); !s.ok())
    return FinishUnary(context, s);
  if (auto s = RequireJobId(request->job_id()); !s.ok()) return FinishUnary(context, s);
  if (!options_.delete_job) {
    return FinishUnary(context, absl::UnimplementedError("this server deletes no jobs"));
  }
  BlockingCalls* pool = options_.deletions != nullptr ? options_.deletions : options_.blocking;
  if (pool == nullptr) return FinishUnary(context, options_.delete_job(request->job_id()));
  // Removing a job's checkpoints and merged export may take a while on a slow disk.
  // Deleting goes on when the client gives up (what it removed stays removed; a retry finishes
  // what is left), and stops early only when lorad stops.
  return pool->Run(context, [this, id = request->job_id()](const std::atomic<bool>&) {
    return options_.delete_job(id);
  });
}

grpc::ServerUnaryReactor* TrainingService::RetryJob(grpc::CallbackServerContext* context,
                                                    const lorad::v1::RetryJobRequest* request,
                                                    lorad::v1::Job* response) {
  if (auto s = Authorize(context, Role::kAdmin, "RetryJob " + request->job_id()); !s.ok())
    return FinishUnary(context, s);
  if (auto s = RequireJobId(request->job_id()); !s.ok()) return FinishUnary(context, s);
  if (!options_.retry_job) {
    return FinishUnary(context, absl::UnimplementedError("this server retries no jobs"));
  }
  auto record = options_.retry_job(request->job_id());
  if (!record.ok()) return FinishUnary(context, record.status());
  return FinishUnary(context, FillReply(*record, response));
}

grpc::ServerWriteReactor<JobEvent>* TrainingService::WatchJob(
    grpc::CallbackServerContext* context, const lorad::v1::WatchJobRequest* request) {
  absl::Status admitted = Authorize(context, Role::kUser);
  std::optional<OpenCalls::Slot> slot = open_watches_.TryTake();
  if (admitted.ok() && !slot) {
    admitted = absl::ResourceExhaustedError(
        absl::StrCat(open_watches_.limit(), " WatchJob streams are open; retry later"));
  }
  return new WatchJobReactor(store_, events_, *request, admitted, CallDeadline(*context),
                             std::move(slot));
}

absl::Status TrainingService::Authorize(const grpc::CallbackServerContext* context, Role needed,
                                        const std::string& action) const {
  return options_.auth ? AuthorizeCall(*options_.auth, *context, needed, action) : absl::OkStatus();
}

}  // namespace lorad::server
