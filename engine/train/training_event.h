// TrainingEvent: what a running Trainer reports through its callback, one record per event.
// torch-free: the server turns each into a JobEvent (proto), a job-store row and metrics.
//
// Order: kStep after every optimizer step; kEval after the step it follows (every eval_every
// steps); kCheckpoint after a checkpoint is durable on disk (a periodic one is written while the
// job trains on: later steps' events may come first), and once more for the checkpoint a
// resumed job starts from; exactly one of kFinished or kFailed last (a cancelled job ends with
// kFinished, summary.cancelled = true). kWarning (any time): something the job waits out or works
// around, in words a user can act on (a checkpoint that could not be written: the job retries).
#pragma once

#include <cstdint>
#include <string>

#include "engine/train/rouge.h"

namespace lorad::engine {

struct StepMetrics {
  int64_t step = 0;          // 1-based optimizer step just completed
  int64_t total_steps = 0;   // planned optimizer steps
  double epoch = 0;          // fractional passes over the training split so far
  double loss = 0;           // token-weighted mean loss over the step's micro-batches
  double learning_rate = 0;  // the rate this step used
  double grad_norm = 0;      // global L2 norm of the LoRA gradients before clipping
  int64_t tokens = 0;        // input tokens (padding excluded) in this step
  double tokens_per_s = 0;
  double step_time_s = 0;  // wall time of this step's micro-batches and update
  double elapsed_s = 0;    // training time so far (a resumed job goes on from its checkpoint's)
  double eta_s = 0;        // estimated time left, from the mean step time so far
};

struct EvalMetrics {
  int64_t step = 0;
  double loss = 0;  // token-weighted mean over the validation split
  int64_t tokens = 0;
};

struct CheckpointWritten {
  int64_t step = 0;
  std::string path;  // the checkpoint folder
};

struct TrainingSummary {
  int64_t steps = 0;
  double epochs = 0;
  // The training loop's time, over every run (not the held-out answers and export after it).
  double runtime_s = 0;
  double final_loss = 0;  // last step's training loss
  double train_loss = 0;  // the mean of every step's loss (transformers' train_loss); 0: unknown
  double best_loss = 0;   // best validation loss when evaluated, else the best training loss
  bool best_is_eval = false;
  bool cancelled = false;
  bool early_stopped = false;
  int64_t skipped_records = 0;  // bad dataset records skipped (DatasetConfig::skip_bad_lines)
  std::string first_skipped;    // the first one's place and why (TrainingData::first_skipped)
  // Examples left out for having no trained token within max_seq_length, and examples cut there.
  int64_t dropped_examples = 0;
  int64_t truncated_examples = 0;
  int64_t trained_tokens = 0;  // input tokens of every step, over all runs of a resumed job
  std::string adapter_path;    // the final PEFT adapter folder
  int64_t adapter_step = 0;    // the step whose weights it holds (load_best_at_end: the best's)
  std::string merged_path;     // the merged 16-bit model folder, when export_merged_dtype is set
  std::string merged_error;    // why it was not written (no room for it); merged_path is then ""
  // With a validation split: the held-out report (loss, ROUGE-1/2/L of greedy answers), also
  // written as eval_report.json.
  bool has_eval_report = false;
  std::string eval_report_path;
  double eval_loss = 0;
  int64_t answered = 0;  // held-out examples answered for ROUGE (0: no ROUGE)
  RougeScores rouge;     // mean F-measures
};

struct TrainingEvent {
  enum class Kind { kStep, kEval, kCheckpoint, kFinished, kFailed, kWarning };
  Kind kind = Kind::kStep;
  StepMetrics step;              // kStep; kWarning: step.step only
  EvalMetrics eval;              // kEval
  CheckpointWritten checkpoint;  // kCheckpoint
  TrainingSummary summary;       // kFinished
  std::string error;             // kFailed, kWarning: a message a user can act on
  // kStep, kEval, kCheckpoint: reported again by a resumed job from its checkpoint (its recent
  // steps and evaluations, then the checkpoint it starts from: a process killed before its
  // history was recorded had lost them, as the runner records events after the trainer reports
  // them). Record what is missing and keep what is there; it is not new progress (no metrics, no
  // counters).
  bool replayed = false;
};

}  // namespace lorad::engine
