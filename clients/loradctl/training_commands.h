// `loradctl train ...`: submit a job from YAML, watch it, list, show, cancel and delete jobs.
// Each function runs one command and returns the process exit code (exit_codes.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "clients/loradctl/connection.h"

namespace lorad::cli {

// Prints the new job's id on stdout (alone, so `ID=$(loradctl train submit job.yaml)` works);
// with `watch`, then follows it as RunTrainWatch does.
// request_id: SubmitJobRequest.request_id (empty: none).
int RunTrainSubmit(Connection& connection, const std::string& yaml_path,
                   const std::string& request_id, bool watch);

// Streams the job's events from `from_step` until it ends. 0 when it succeeded,
// kExitJobFailed / kExitJobCancelled otherwise.
int RunTrainWatch(Connection& connection, const std::string& job_id, int64_t from_step);

// A table of the newest `limit` jobs, optionally only those in `states` ("queued", ...).
// `json`: the jobs as one ListJobsResponse in JSON (every field), for scripts.
int RunTrainList(Connection& connection, const std::vector<std::string>& states, int limit,
                 bool json);

// How `train show` prints a job: its details and spec; the whole lorad.v1.Job as JSON; or only
// the spec as a job file (`train submit` takes it back).
enum class JobShowFormat { kText, kJson, kSpec };
int RunTrainShow(Connection& connection, const std::string& job_id, JobShowFormat format);

int RunTrainCancel(Connection& connection, const std::string& job_id);

// Deletes an ended job with its history and files; prints "<id>: deleted".
int RunTrainDelete(Connection& connection, const std::string& job_id);
// RetryJob: prints "ID: queued".
int RunTrainRetry(Connection& connection, const std::string& job_id);

}  // namespace lorad::cli
