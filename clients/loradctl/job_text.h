// How jobs read on a terminal: state names, durations, timestamps, and the `train show` report.
#pragma once

#include <google/protobuf/timestamp.pb.h>

#include <string>

#include "lorad/v1/training.pb.h"

namespace lorad::cli {

std::string JobStateName(lorad::v1::JobState state);  // "queued", "running", ...

// "42s", "3m05s", "2h01m"; "-" for a negative (unknown) duration.
std::string FormatDuration(double seconds);

// Local time "2025-01-31 14:05:09"; "-" when unset.
std::string FormatTimestamp(const google::protobuf::Timestamp& time);

// "12/40" or "12" when the total is unknown.
std::string FormatProgress(int64_t step, int64_t total_steps);

// What the dataset lost, for a finished job's result line: "" or "; 2 bad lines skipped, 1 example
// dropped (no response within max_seq_length), 3 truncated at max_seq_length".
std::string FormatDatasetLosses(const lorad::v1::JobSummary& summary);
// "final loss 1.2345 (mean 2.3456)": the last step's loss and the mean of all steps' (the
// number transformers prints as train_loss), the mean left out when unknown.
std::string FormatTrainingLoss(const lorad::v1::JobSummary& summary);

// Several "key: value" lines, then the spec as job YAML under "spec:".
std::string FormatJobDetails(const lorad::v1::Job& job);

}  // namespace lorad::cli
