// TrainingCheckpoint: what a Trainer needs to continue exactly where it stopped, on disk.
//
// Layout of <output_dir>/checkpoint-<step>/ (written as .checkpoint-<step>.tmp, every file
// fsynced, then renamed, then the parent fsynced: a folder named checkpoint-<step> is complete):
//   adapter/             the LoRA adapter in PEFT format (loadable by PEFT as it is)
//   optimizer.pt         the optimizer's SaveState() (torch::serialize archive)
//   rng.pt               the CPU generator state (LoRA dropout)
//   trainer_state.json   TrainerState below
// Thread rules: none; the GPU loop thread writes and reads.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/lora/lora_adapter.h"
#include "engine/runtime/random_state.h"
#include "engine/train/checkpoint_folders.h"
#include "engine/train/optimizer.h"
#include "engine/train/training_event.h"

namespace lorad::engine {

struct TrainerState {
  int64_t step = 0;           // optimizer steps completed
  int64_t micro_batches = 0;  // micro-batches consumed: the data cursor
  double last_loss = 0;
  double best_train_loss = 0;  // valid once step > 0
  double best_eval_loss = 0;   // valid when has_eval
  int64_t best_eval_step = 0;  // the step of that evaluation
  bool has_eval = false;
  int64_t evals_without_improvement = 0;
  // The step of the last evaluation reported (0: none yet), so that a resume neither repeats an
  // evaluation nor misses one a shutdown interrupted. -1 in checkpoints of older lorad versions
  // (unknown).
  int64_t last_eval_step = 0;
  // Totals over every run of the job up to this step (a resumed job continues them).
  int64_t trained_tokens = 0;
  double train_seconds = 0;
  // Every step's loss added up (transformers' train_loss is their mean); NaN in checkpoints of
  // older lorad versions (unknown: the summary then reports no mean).
  double loss_sum = 0;
  // The dataset files' contents when the job started (size and hash of each): a resume on files
  // that changed since would train the rest of the job on other examples. "" in checkpoints of
  // older lorad versions (not checked).
  std::string dataset_fingerprint;
  // The base model folder's contents (ModelFolderFingerprint) and the operator's chat template
  // (for a job that takes the model's own) when the job started: a resume on another base (a
  // re-download of another revision, the Instruct variant, same shapes) would train the rest of the
  // job on it. "" in checkpoints of older lorad versions (not checked).
  std::string base_fingerprint;
  // The last kRecentSteps steps' metrics and the evaluations among them, as reported: a resume
  // reports them again (TrainingEvent::replayed), where the process was killed before its
  // history was recorded. Empty in checkpoints of older lorad versions.
  static constexpr size_t kRecentSteps = 512;
  std::vector<StepMetrics> recent_steps;
  std::vector<EvalMetrics> recent_evals;
  // Keeps `e` (a kStep or kEval not replayed) among the recent ones.
  void Remember(const TrainingEvent& e);
};

struct TrainingCheckpoint {
  LoraAdapter adapter;
  OptimizerState optimizer;
  // The job's random stream: the CPU generator's state, and the CUDA one's when it trained on a
  // GPU (LoRA dropout draws there); cuda_device is not kept.
  RandomState rng;
  TrainerState state;
};

// Writes atomically; returns the checkpoint folder. An existing folder of the same step is
// replaced; then all but the newest `keep` checkpoints are deleted (0: none is). Errors name the
// file that could not be written; a failed write leaves no partial folder behind. `rng` is the
// job's random stream (its LoRA dropout draws).
absl::StatusOr<std::string> WriteCheckpoint(const std::string& output_dir,
                                            const LoraAdapter& adapter,
                                            const OptimizerState& optimizer, const RandomState& rng,
                                            const TrainerState& state, int64_t keep = 0);

// Errors name the folder and the file at fault.
absl::StatusOr<TrainingCheckpoint> ReadCheckpoint(const std::string& folder);

}  // namespace lorad::engine
