// TrainingService: the gRPC face of the job queue (proto/lorad/v1/training.proto). Validates and
// stores jobs, answers queries, cancels, and streams each job's history and live events.
// Running a job is the job runner's work (it takes queued jobs from the JobStore and publishes
// their events on the JobEventHub).
//
// Thread rules: handlers run on gRPC's callback threads; state lives in JobStore and JobEventHub,
// both thread-safe.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>

#include "lorad/v1/training.grpc.pb.h"
#include "server/blocking_calls.h"
#include "server/job_event_hub.h"
#include "server/job_spec_validator.h"
#include "server/job_store.h"
#include "server/open_calls.h"
#include "server/token_authenticator.h"

namespace lorad::server {

struct TrainingServiceOptions {
  JobSpecLimits spec_limits;
  int64_t max_queued_jobs = 64;
  // Called after a job is queued, so the job runner looks for work.
  std::function<void()> on_submit;
  // Called after a job is cancelled, so a running job can be stopped (set by the job runner).
  std::function<void(const std::string& job_id)> on_cancel;
  // Deletes an ended job with its files (JobRunner::DeleteJob); unset: DeleteJob is
  // UNIMPLEMENTED.
  std::function<absl::Status(const std::string& job_id)> delete_job;
  // Queues a failed or cancelled job again (JobRunner::RetryJob); unset: RetryJob is
  // UNIMPLEMENTED.
  std::function<absl::StatusOr<JobRecord>(const std::string& job_id)> retry_job;
  // Why a queued job has not started (JobRunner::WaitingFor); unset: only its place in line.
  std::function<std::string(const std::string& job_id, bool first_in_line)> waiting_for;
  // Bearer tokens (none configured: open). Submit, cancel and delete need admin; reads need user.
  const TokenAuthenticator* auth = nullptr;
  // The checks of a validated spec that need the model, whose error refuses it at submit: a job
  // that could never fit the training memory (RESOURCE_EXHAUSTED saying how much it needs), data
  // that would fail at the job's start (INVALID_ARGUMENT naming the file and line); unset: none.
  // `abandon` (null when nothing can) turns true once the call's client is gone or lorad stops.
  std::function<absl::Status(const lorad::v1::JobSpec&, const std::atomic<bool>* abandon)>
      check_job;
  // WatchJob streams open at once (each holds a page of history and a subscription); more are
  // RESOURCE_EXHAUSTED.
  int64_t max_watches = 1024;
  // Where SubmitJob reads the dataset and runs check_job, off gRPC's threads; null: on the
  // handler's thread (tests).
  BlockingCalls* blocking = nullptr;
  // Where SubmitJob checks a spec that names no dataset file (inline examples only): not behind
  // the counts of large files (`blocking` when null).
  BlockingCalls* file_free = nullptr;
  // Held while a job that continues an adapter is queued (JobRunner::HoldJobFolders): DeleteJob
  // does not remove that adapter's folder between the check of its files and the job's record.
  std::function<std::unique_lock<std::mutex>()> hold_job_folders;
  // Where DeleteJob removes a job's files: not behind submissions, whose dataset checks may take
  // minutes each (`blocking` when null).
  BlockingCalls* deletions = nullptr;
};

class TrainingService final : public lorad::v1::TrainingService::CallbackService {
 public:
  TrainingService(JobStore& store, JobEventHub& events, TrainingServiceOptions options);

  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const lorad::v1::SubmitJobRequest* request,
                                      lorad::v1::Job* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const lorad::v1::GetJobRequest* request,
                                   lorad::v1::Job* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const lorad::v1::ListJobsRequest* request,
                                     lorad::v1::ListJobsResponse* response) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const lorad::v1::CancelJobRequest* request,
                                      lorad::v1::Job* response) override;
  grpc::ServerUnaryReactor* DeleteJob(grpc::CallbackServerContext* context,
                                      const lorad::v1::DeleteJobRequest* request,
                                      lorad::v1::DeleteJobResponse* response) override;
  grpc::ServerUnaryReactor* RetryJob(grpc::CallbackServerContext* context,
                                     const lorad::v1::RetryJobRequest* request,
                                     lorad::v1::Job* response) override;
  grpc::ServerWriteReactor<lorad::v1::JobEvent>* WatchJob(
      grpc::CallbackServerContext* context, const lorad::v1::WatchJobRequest* request) override;

 private:
  // `action`: an admin method's name, logged with the caller's token name (AuthorizeCall).
  absl::Status Authorize(const grpc::CallbackServerContext* context, Role needed,
                         const std::string& action = "") const;
  // The proto view of a stored job, with its latest step.
  // `queue_order` (JobStore::QueueOrder; read here when null and the job is queued): a page of
  // jobs reads it once.
  absl::Status FillJob(const JobRecord& record, lorad::v1::Job* job,
                       const std::map<std::string, int64_t>* queue_order = nullptr);
  // FillJob without the spec's inline examples, for every reply but GetJob's: echoed, a reply
  // outgrew its request, and a client's receive limit (gRPC's 4 MiB) turned a call that took
  // effect (a queued job, a cancel) into a failure it would send again; a page of 500 jobs with
  // megabytes each made responses of gigabytes.
  absl::Status FillReply(const JobRecord& record, lorad::v1::Job* job,
                         const std::map<std::string, int64_t>* queue_order = nullptr);
  // SubmitJob's work: validate (reading the dataset), check, queue, answer in `response`;
  // CANCELLED, nothing queued, once `*abandon` is true (the client gone, lorad stopping).
  // `submission`: the client's request_id for it, where it sent one.
  absl::Status Submit(lorad::v1::JobSpec& spec,
                      const std::optional<JobStore::Submission>& submission,
                      const std::atomic<bool>* abandon, lorad::v1::Job* response);
  // SubmitJob sent again: the job `submission`'s request_id queued in `response` (OK), or
  // ALREADY_EXISTS where that submission sent another spec; nullopt where no job holds the id.
  std::optional<absl::Status> Resubmitted(const JobStore::Submission& submission,
                                          lorad::v1::Job* response);

  JobStore& store_;
  JobEventHub& events_;
  TrainingServiceOptions options_;
  OpenCalls open_watches_;  // a WatchJob stream holds its slot until it is done
};

// Proto <-> store conversions shared with the job runner.
lorad::v1::JobState ToProtoState(JobState state);
// `total_steps`: the job's planned steps (the trainer's count), sent with every step.
lorad::v1::StepMetrics ToProtoStep(const StepRecord& step, int64_t total_steps);
lorad::v1::JobEvent StateEvent(const std::string& job_id, JobState state, int64_t time_ms);

}  // namespace lorad::server
