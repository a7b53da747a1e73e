#include "clients/loradctl/training_commands.h"

#include <unistd.h>

#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "clients/loradctl/enum_names.h"
#include "clients/loradctl/exit_codes.h"
#include "clients/loradctl/job_progress_printer.h"
#include "clients/loradctl/job_spec_yaml.h"
#include "clients/loradctl/job_text.h"
#include "clients/loradctl/json_output.h"
#include "clients/loradctl/text_table.h"
#include "clients/loradctl/utf8_fields.h"

namespace lorad::cli {

namespace {

using lorad::v1::Job;
using lorad::v1::JobEvent;
using lorad::v1::JobState;

// The server caps a page at 500 jobs; larger --limit values take several pages.
constexpr int kMaxPageSize = 500;

bool IsTerminal(JobState state) {
  return state == lorad::v1::JOB_STATE_SUCCEEDED || state == lorad::v1::JOB_STATE_FAILED ||
         state == lorad::v1::JOB_STATE_CANCELLED;
}

int ExitCodeForFinalState(JobState state) {
  switch (state) {
    case lorad::v1::JOB_STATE_SUCCEEDED:
      return kExitOk;
    case lorad::v1::JOB_STATE_CANCELLED:
      return kExitJobCancelled;
    default:
      return kExitJobFailed;
  }
}

// The terminal state an event announces, or UNSPECIFIED when it announces none.
JobState TerminalStateOf(const JobEvent& event) {
  switch (event.event_case()) {
    case JobEvent::kState:
      return IsTerminal(event.state()) ? event.state() : lorad::v1::JOB_STATE_UNSPECIFIED;
    case JobEvent::kFinished:
      return lorad::v1::JOB_STATE_SUCCEEDED;
    case JobEvent::kFailed:
      return lorad::v1::JOB_STATE_FAILED;
    default:
      return lorad::v1::JOB_STATE_UNSPECIFIED;
  }
}

grpc::Status GetJob(Connection& connection, const std::string& job_id, Job* job) {
  lorad::v1::GetJobRequest request;
  request.set_job_id(job_id);
  auto context = connection.NewContext(CallKind::kUnary);
  return connection.training().GetJob(context.get(), request, job);
}

}  // namespace

int RunTrainSubmit(Connection& connection, const std::string& yaml_path,
                   const std::string& request_id, bool watch) {
  auto spec = LoadJobSpecYaml(yaml_path);
  if (!spec.ok()) {
    std::cerr << "loradctl: " << spec.status().message() << std::endl;
    return spec.status().code() == absl::StatusCode::kInvalidArgument ? kExitUsage : kExitError;
  }
  lorad::v1::SubmitJobRequest request;
  *request.mutable_spec() = *std::move(spec);
  request.set_request_id(request_id);
  if (ReportInvalidUtf8(request)) return kExitUsage;  // "spec.dataset.path: not UTF-8 ..."
  Job job;
  auto context = connection.NewContext(CallKind::kSlowUnary);
  grpc::Status status = connection.training().SubmitJob(context.get(), request, &job);
  if (!status.ok()) return connection.Fail(status);
  std::cout << job.id() << std::endl;
  // Queued whatever happens to the output: where it cannot be written (a full disk), the id
  // still reaches the user, and a script retrying on the failure would queue the job twice.
  if (!std::cout.flush()) {
    std::cerr << "loradctl: job " << job.id()
              << " was queued, but its id could not be written to the output" << std::endl;
  }
  if (watch) return RunTrainWatch(connection, job.id(), 0);
  // Only a request_id sent again returns an ended job: nothing new was queued, and a script
  // must not take the first job's failure for a new job.
  if (IsTerminal(job.state())) {
    std::cerr << "loradctl: request_id '" << request_id << "' queued job " << job.id()
              << " before, which has ended (" << JobStateName(job.state())
              << "); nothing new was queued: give another --request-id to train again" << std::endl;
    return ExitCodeForFinalState(job.state());
  }
  return kExitOk;
}

int RunTrainWatch(Connection& connection, const std::string& job_id, int64_t from_step) {
  // GetJob first: it fails fast on a wrong id and gives the total for the progress bar.
  Job job;
  if (grpc::Status status = GetJob(connection, job_id, &job); !status.ok()) {
    return connection.Fail(status);
  }
  const auto& dataset = job.spec().dataset();
  JobProgressPrinter printer(
      std::cout, isatty(STDOUT_FILENO) != 0, job.total_steps(),
      !dataset.validation_path().empty() || dataset.validation_fraction() > 0);
  lorad::v1::WatchJobRequest request;
  request.set_job_id(job_id);
  request.set_from_step(from_step);
  auto context = connection.NewContext(CallKind::kWatch);
  auto reader = connection.training().WatchJob(context.get(), request);
  JobState final_state = lorad::v1::JOB_STATE_UNSPECIFIED;
  JobEvent event;
  bool answered = false;
  while (reader->Read(&event)) {
    answered = true;
    printer.Print(event);
    const JobState terminal = TerminalStateOf(event);
    if (terminal != lorad::v1::JOB_STATE_UNSPECIFIED) final_state = terminal;
  }
  printer.Finish();
  if (grpc::Status status = reader->Finish(); !status.ok()) {
    return connection.Fail(status, answered);
  }
  if (final_state == lorad::v1::JOB_STATE_UNSPECIFIED) {
    // The stream ended without saying how (the daemon draining, say): ask for the state.
    if (grpc::Status status = GetJob(connection, job_id, &job); !status.ok()) {
      return connection.Fail(status);
    }
    if (!IsTerminal(job.state())) {
      std::cerr << "loradctl: the event stream ended while " << job_id << " is still "
                << JobStateName(job.state()) << "; run `loradctl train watch " << job_id
                << "` again" << std::endl;
      return kExitError;
    }
    final_state = job.state();
  }
  return ExitCodeForFinalState(final_state);
}

int RunTrainList(Connection& connection, const std::vector<std::string>& states, int limit,
                 bool json) {
  lorad::v1::ListJobsRequest request;
  for (const std::string& name : states) {
    const auto* value = ParseEnumShortName(lorad::v1::JobState_descriptor(), name);
    if (value == nullptr || value->number() == lorad::v1::JOB_STATE_UNSPECIFIED) {
      std::cerr << "loradctl: --state: unknown state '" << name
                << "' (one of queued, running, succeeded, failed, cancelled)" << std::endl;
      return kExitUsage;
    }
    request.add_states(static_cast<JobState>(value->number()));
  }
  TextTable table({"ID", "STATE", "ADAPTER", "STEP", "LOSS", "CREATED"});
  lorad::v1::ListJobsResponse all;  // with --json: the jobs listed, as one reply
  int listed = 0;
  bool more = false;  // jobs left out by the limit
  while (listed < limit) {
    request.set_page_size(std::min(limit - listed, kMaxPageSize));
    lorad::v1::ListJobsResponse response;
    auto context = connection.NewContext(CallKind::kUnary);
    grpc::Status status = connection.training().ListJobs(context.get(), request, &response);
    if (!status.ok()) return connection.Fail(status);
    for (const Job& job : response.jobs()) {
      if (listed == limit) break;  // a server that ignores page_size
      ++listed;
      if (json) *all.add_jobs() = job;
      const bool has_step = job.last_step().step() > 0;
      table.AddRow({job.id(), JobStateName(job.state()), job.spec().adapter_name(),
                    FormatProgress(job.last_step().step(), job.total_steps()),
                    has_step ? absl::StrFormat("%.4f", job.last_step().loss()) : "-",
                    FormatTimestamp(job.created())});
    }
    more = !response.next_page_token().empty() && !response.jobs().empty();
    if (!more) break;
    request.set_page_token(response.next_page_token());
  }
  if (json) {
    if (const int code = PrintJson(all, "the jobs"); code != kExitOk) return code;
  } else {
    table.Print(std::cout);
  }
  // Jobs are kept until deleted: past the limit, an older (failed) job looked absent.
  if (more && listed == limit) {
    std::cerr << "(the newest " << limit << " shown; older ones: --limit " << 2 * limit << ")"
              << std::endl;
  }
  return kExitOk;
}

int RunTrainShow(Connection& connection, const std::string& job_id, JobShowFormat format) {
  Job job;
  if (grpc::Status status = GetJob(connection, job_id, &job); !status.ok()) {
    return connection.Fail(status);
  }
  if (format == JobShowFormat::kText) {
    std::cout << FormatJobDetails(job);
    return kExitOk;
  }
  if (format == JobShowFormat::kSpec) {
    std::cout << JobSpecToYaml(job.spec());
    return kExitOk;
  }
  return PrintJson(job, job_id);
}

int RunTrainCancel(Connection& connection, const std::string& job_id) {
  lorad::v1::CancelJobRequest request;
  request.set_job_id(job_id);
  Job job;
  auto context = connection.NewContext(CallKind::kUnary);
  grpc::Status status = connection.training().CancelJob(context.get(), request, &job);
  if (!status.ok()) return connection.Fail(status);
  // Cancelling a finished job is a no-op on the server; the state printed says which happened.
  std::cout << job.id() << ": " << JobStateName(job.state()) << std::endl;
  return kExitOk;
}

int RunTrainRetry(Connection& connection, const std::string& job_id) {
  lorad::v1::RetryJobRequest request;
  request.set_job_id(job_id);
  Job job;
  auto context = connection.NewContext(CallKind::kUnary);
  grpc::Status status = connection.training().RetryJob(context.get(), request, &job);
  if (!status.ok()) return connection.Fail(status);
  std::cout << job.id() << ": " << JobStateName(job.state()) << std::endl;
  return kExitOk;
}

int RunTrainDelete(Connection& connection, const std::string& job_id) {
  lorad::v1::DeleteJobRequest request;
  request.set_job_id(job_id);
  lorad::v1::DeleteJobResponse response;
  auto context = connection.NewContext(CallKind::kSlowUnary);
  grpc::Status status = connection.training().DeleteJob(context.get(), request, &response);
  if (!status.ok()) return connection.Fail(status);
  std::cout << job_id << ": deleted" << std::endl;
  return kExitOk;
}

}  // namespace lorad::cli
