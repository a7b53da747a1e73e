// The job YAML file: a lorad.v1.JobSpec written as YAML, key for key (field names of
// proto/lorad/v1/training.proto; enums by short name, e.g. `optimizer: adamw_8bit`).
//
//   adapter_name: qa-bot
//   dataset: {path: qa.jsonl, format: qa}
//   lora: {r: 16, alpha: 32, target_modules: [q_proj, v_proj], rslora: true}
//   training: {max_steps: 100, learning_rate: 2e-4, schedule: cosine}
//
// Parsing is driven by the proto's descriptors, so a field added to the proto is accepted here
// without code changes. Errors say "FILE:LINE: ..." and name the key, for unknown keys, wrong
// types, bad enum names and duplicate keys alike.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "lorad/v1/training.pb.h"

namespace lorad::cli {

// `source` names the text in errors (the file path).
absl::StatusOr<lorad::v1::JobSpec> ParseJobSpecYaml(const std::string& text,
                                                    const std::string& source);

// Reads and parses the file at `path`: a file, a pipe, or "-" for stdin.
absl::StatusOr<lorad::v1::JobSpec> LoadJobSpecYaml(const std::string& path);

// The spec as YAML in the same format (fields left at their defaults are omitted), so the
// output of `train show` can be edited and submitted again (without what SubmitJob fills from
// init_adapter: the folder, version and LoRA settings of the adapter's version then).
std::string JobSpecToYaml(const lorad::v1::JobSpec& spec);

}  // namespace lorad::cli
