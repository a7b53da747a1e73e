// ValidateJobSpec: checks a submitted lorad.v1.JobSpec completely before it is queued, and fills
// in every default so the stored spec says exactly what will run. Errors are INVALID_ARGUMENT
// naming the field ("training.learning_rate: ..."), or PERMISSION_DENIED for a dataset path
// outside the dataset root.
#pragma once

#include <atomic>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/train/training_job_config.h"
#include "lorad/v1/training.pb.h"
#include "server/job_store.h"

namespace lorad::server {

struct JobSpecLimits {
  std::string dataset_root;  // resolved dataset paths must stay inside it
  int64_t max_inline_examples = 10000;
  int64_t max_steps = 1000000;
  int32_t max_seq_length = 32768;
  int64_t model_layers = 0;  // the served model's decoder layers; 0 = not checked
};

// The number of training examples the dataset yields, for the job's step estimate.
struct ValidatedDataset {
  std::string resolved_path;  // empty for inline examples
  int64_t examples = 0;
  int64_t skipped = 0;
};

// An adapter name, as a job publishes it (`adapter_name`) or LoadAdapter serves it (`name`): it
// becomes a folder name and a metric label, so it stays plain. INVALID_ARGUMENT naming `field`.
absl::Status CheckAdapterName(const std::string& name, const std::string& field);

// Validates `spec` in place (defaults filled, dataset path replaced by its resolved form) and
// reads the dataset once to prove it parses; CANCELLED soon after `*abandon` turns true.
absl::StatusOr<ValidatedDataset> ValidateJobSpec(lorad::v1::JobSpec& spec,
                                                 const JobSpecLimits& limits,
                                                 const std::atomic<bool>* abandon = nullptr);

// JobSpec.init_adapter: the adapter a job continues, found among `served` (the adapters lorad
// serves, as the job store records them). Sets init_adapter_path and init_adapter_version (or
// clears them when init_adapter is empty), and fills an unset `lora` with the adapter's settings,
// read from its adapter_config.json; an explicit `lora` must agree. NOT_FOUND for an adapter not
// served, INVALID_ARGUMENT naming the field otherwise.
absl::Status ResolveInitAdapter(lorad::v1::JobSpec& spec, const std::vector<ServedAdapter>& served);

// FAILED_PRECONDITION when the folder of the adapter a job continues (ResolveInitAdapter's) is
// gone or holds other files than when the job was submitted: checked again as the job is queued
// (its dataset check takes time, in which the folder's job may be deleted) and retried.
absl::Status CheckInitAdapterUnchanged(const lorad::v1::JobSpec& spec);

// What errors call a request's inline records: "dataset.inline_examples[2]" (0-based).
inline constexpr absl::string_view kInlineExamples = "dataset.inline_examples";

// The engine's view of a validated spec (defaults filled), for a job whose files go to
// `output_dir`; inline examples are read from <output_dir>/inline_dataset.jsonl (the job runner
// writes it), and errors name them as the request does. No file is touched here.
engine::TrainingJobConfig TrainingJobConfigOf(const lorad::v1::JobSpec& spec,
                                              const std::string& output_dir);

// The engine's view of a stored JobSpec (TrainingJobConfigOf), after creating `output_dir` and
// writing the inline examples to <output_dir>/inline_dataset.jsonl. The dataset files are checked
// again against `dataset_root`: one may have been replaced by a symlink to elsewhere while the job
// waited in the queue. UNAVAILABLE when storage refuses the folder or the examples' file (a full
// disk, a folder that cannot be written): the job can start once it takes them.
absl::StatusOr<engine::TrainingJobConfig> TrainingJobConfigFromSpec(
    const lorad::v1::JobSpec& spec, const std::string& output_dir, const std::string& dataset_root);

// Optimizer steps the job will run: max_steps, or epochs over the examples.
int64_t TotalSteps(const lorad::v1::JobSpec& spec, int64_t examples);

}  // namespace lorad::server
