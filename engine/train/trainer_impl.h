// Trainer::Impl, the trainer's state and steps, shared by the files that define its parts:
// trainer.cpp (set-up, steps, evaluations, checkpoints) and trainer_end.cpp (the end of a job:
// its last evaluation and checkpoint, held-out answers, files, summary). Not part of the API.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/lora/lora_adapter.h"
#include "engine/lora/merged_model_writer.h"
#include "engine/model/llama_model.h"
#include "engine/model/tokenizer.h"
#include "engine/runtime/durable_file.h"
#include "engine/runtime/file_fingerprint.h"
#include "engine/runtime/random_state.h"
#include "engine/train/answer_evaluation.h"
#include "engine/train/checkpoint_folders.h"
#include "engine/train/chunked_cross_entropy.h"
#include "engine/train/example_formatter.h"
#include "engine/train/lr_schedule.h"
#include "engine/train/micro_batch.h"
#include "engine/train/optimizer.h"
#include "engine/train/step_pace.h"
#include "engine/train/trainer.h"
#include "engine/train/training_checkpoint.h"
#include "engine/train/training_data.h"

namespace lorad::engine {
namespace trainer_impl {

using Clock = std::chrono::steady_clock;

// The held-out examples the report answers for ROUGE (the first ones with a prompt): greedy
// answers on the training job's turn of the GPU loop, so a bounded number.
inline constexpr int64_t kAnsweredExamples = 32;
inline constexpr int64_t kAnswerTokens = 128;  // the longest answer

inline double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// A checkpoint's contents, copied to the host (trainer_checkpoints.cpp).
struct CheckpointSnapshot {
  LoraAdapter adapter;
  OptimizerState optimizer;
  RandomState rng;
  TrainerState state;
};

}  // namespace trainer_impl

struct Trainer::PreparedData {
  TrainingJobConfig config;  // as given, max_seq_length capped at the model's sliding window
  std::string end_of_turn;   // the chat template's, where evaluated answers end
  MergedChatTemplate merged_template;  // what the merged export's tokenizer files get
  std::string dataset_fingerprint;
  std::string base_fingerprint;  // TrainerState::base_fingerprint
  std::optional<TrainingData> data;
  // What the job starts from, read here rather than on the GPU loop (a large model's optimizer
  // state is hundreds of MB): the checkpoint it resumes from (its folder in resumed_from, the
  // damaged ones passed over in resume_warnings), or the adapter it continues.
  std::optional<TrainingCheckpoint> checkpoint;
  std::string resumed_from;
  std::vector<std::string> resume_warnings;
  std::optional<LoraAdapter> init_adapter;
};

struct Trainer::Impl {
  const LlamaModel* model = nullptr;
  const Tokenizer* tokenizer = nullptr;
  std::string end_of_turn;  // the chat template's, where evaluated answers end
  MergedChatTemplate merged_template;
  TrainingJobConfig config;
  EventCallback on_event;
  std::optional<TrainingData> data;
  LoraAdapter adapter;
  std::vector<torch::Tensor> params;  // the adapter's tensors, fp32, requires_grad
  std::unique_ptr<Optimizer> optimizer;
  std::optional<LrSchedule> schedule;
  TrainerState state;
  int64_t total_steps = 0;
  int64_t per_epoch = 1;
  bool resumed = false;
  std::string resumed_from;  // the checkpoint folder, until the first Step reports it
  std::vector<std::string> resume_warnings;  // damaged checkpoints passed over, until then too
  bool done = false;
  std::atomic<bool> cancel{false};
  std::atomic<bool> interrupt{false};  // Interrupt(): skip periodic evaluations

  // The optimizer step in progress.
  int64_t micro_in_step = 0;  // micro-batches of this step already run
  int64_t step_micro = 0;     // micro-batches in this step
  int64_t step_tokens = 0;    // trained tokens over the whole step: the loss's denominator
  int64_t step_input_tokens = 0;
  torch::Tensor step_loss_sum;  // the step's summed token losses so far, on the device, fp64
  trainer_impl::Clock::time_point step_start;
  trainer_impl::Clock::time_point job_start = trainer_impl::Clock::now();
  double seconds_before_this_run = 0;  // a resumed job's time up to its checkpoint
  int64_t steps_this_run = 0;
  StepPace pace;  // the ETA's
  // This job's random stream (LoRA dropout), installed in the default generators while it steps:
  // jobs that take turns on the GPU loop never draw from each other's.
  RandomState random;

  absl::Status Init(const Tokenizer& tokenizer, const std::string& model_folder,
                    PreparedData prepared);
  std::string model_folder;  // the base model's folder (chat template; merged export)
  absl::Status StepOrThrow();
  void PlanStep();
  absl::Status FinishStep();
  // Work that follows an optimizer step runs a piece per Step(), so that the GPU loop serves
  // between pieces (an evaluation of a large validation split, or the held-out answers, took
  // minutes in one piece): a periodic evaluation, one validation micro-batch a piece; and once
  // training ends, the finishing stages (Finishing).
  struct EvalProgress {
    size_t next_row = 0;
    double sum = 0;
    int64_t tokens = 0;
  };
  std::optional<EvalProgress> periodic_eval;  // the evaluation after the step just completed
  std::optional<EvalMetrics> last_eval;       // the latest evaluation's result
  struct Finishing {
    // The last step's evaluation (unless the cadence made it), its checkpoint, the best weights'
    // evaluation (load_best_at_end), the held-out answers (one forward a piece), the files.
    enum class Stage {
      kLastEval,
      kLastCheckpoint,
      kBestEval,
      kAnswers,
      kFiles
    } stage = Stage::kLastEval;
    bool early_stopped = false;
    EvalProgress eval;
    bool best_loaded = false;
    std::optional<EvalMetrics> scored;  // the evaluation of the weights the job publishes
    int64_t scored_step = 0;
    size_t next_answer_row = 0;
    std::optional<ExampleAnswerer> answering;  // the held-out example being answered
    AnswerEvaluation answers;
    // The adapter's files, written by a thread of their own while the loop serves (idle_until
    // says when to look again); the host copy is the merged export's too.
    std::shared_ptr<const LoraAdapter> final_adapter;
    std::future<absl::Status> adapter_write;
    bool files_written = false;  // the report and the adapter; the merged export may go on
    std::future<absl::Status> merged_export;
    // Set when a cancel stops the job during its export: the export gives up (minutes for a
    // large model, past a container's stop timeout). After a shutdown's, the job resumes at its
    // end next time; after a user's, it is over.
    std::shared_ptr<std::atomic<bool>> abandon_export = std::make_shared<std::atomic<bool>>(false);
    TrainingSummary summary;
  };
  std::optional<Finishing> finishing;
  // One validation micro-batch into `progress`; true once every row is in.
  absl::StatusOr<bool> EvaluateSome(EvalProgress& progress);
  EvalMetrics EvaluationOf(const EvalProgress& progress) const;
  absl::Status ContinuePeriodicEvaluation();
  // After a step and its evaluation: the end, or a checkpoint when the cadence says so.
  absl::Status AfterStep(bool early_stop);
  absl::Status ContinueFinishing();
  // The adapter's write (Finishing::adapter_write), once done (`wait`: waits for it): sets
  // files_written and starts the merged export; a storage failure starts a wait (the write is
  // started again after it); other errors are returned.
  absl::Status CollectAdapterWrite(bool wait);
  // As a job ends otherwise than at its end (failed, cancelled): unsaved_best to disk, warning
  // if it cannot be.
  void WriteBestBeforeTheEnd();
  // Reports an evaluation and keeps the best (with load_best_at_end also its adapter, written
  // with the next checkpoint, so a resumed job still has it); returns whether it improved on
  // the best.
  absl::StatusOr<bool> ReportEvaluation(const EvalMetrics& eval) {
    last_eval = eval;
    state.last_eval_step = eval.step;
    TrainingEvent ev;
    ev.kind = TrainingEvent::Kind::kEval;
    ev.eval = eval;
    Emit(ev);
    // A non-finite loss (an overflowing forward) never improves on the best: it would replace a
    // real best and reset early stopping's patience.
    if (!std::isfinite(eval.loss)) return false;
    if (state.has_eval && eval.loss >= state.best_eval_loss) return false;
    state.best_eval_loss = eval.loss;
    state.best_eval_step = eval.step;
    state.has_eval = true;
    // Copied to the host here, written with the next checkpoint (the end's at the latest), by
    // its thread and before it: a checkpoint's state names its best, and a resume reads that
    // from best-adapter/. (Written here, on the loop, it held every stream for the files' write
    // and sync at each better evaluation.)
    if (config.load_best_at_end) unsaved_best = adapter.HostCopy();
    return true;
  }
  // Cancelled: ends now. Else starts the finishing stages (ContinueFinishing ends the job).
  absl::Status Finish(bool cancelled, bool early_stopped);
  absl::Status EmitFinished(bool cancelled, bool early_stopped, TrainingSummary summary);
  std::string BestAdapterPath() const {
    return (std::filesystem::path(config.output_dir) / "best-adapter").string();
  }
  // Writes a checkpoint of the job's state now, on this thread (the end's, a cancel's, a
  // shutdown's, a failed one's retry), after the one in flight.
  absl::StatusOr<std::string> Checkpoint();
  // Checkpoint(), its storage failure starting a wait (pending_checkpoint: written again after
  // it); other errors are returned.
  absl::Status CheckpointOrWait();
  void EmitCheckpoint(int64_t step, const std::string& path) {
    TrainingEvent e;
    e.kind = TrainingEvent::Kind::kCheckpoint;
    e.checkpoint = {step, path};
    Emit(e);
  }
  void Emit(const TrainingEvent& e) {
    state.Remember(e);  // a step's and an evaluation's metrics go into the next checkpoint
    if (on_event) on_event(e);
  }
  void Warn(std::string message) {
    TrainingEvent e;
    e.kind = TrainingEvent::Kind::kWarning;
    e.step.step = state.step;  // when it happened
    e.error = std::move(message);
    Emit(e);
  }

  // Writes that fail for want of storage (a full disk, a folder that cannot be written:
  // IsStorageFailure) do not fail the job: what it trained is in memory, and an operator can
  // make room. The job then holds still (Step() does no work) until retry_at, and the write that
  // failed runs again; each failure is a kWarning, and the wait doubles up to
  // config.storage_retry_max_s. A cancel still ends it. Other write errors fail the job.
  struct StorageWait {
    trainer_impl::Clock::time_point retry_at;
    trainer_impl::Clock::time_point since;
  };
  std::optional<StorageWait> storage_wait;
  int storage_failures = 0;   // in a row: the next wait's length
  double seconds_waited = 0;  // this run's waits, left out of its training time
  // load_best_at_end's adapter, not yet on disk (ReportEvaluation; a write that failed).
  std::optional<LoraAdapter> unsaved_best;

  // Checkpoints (trainer_checkpoints.cpp). What one holds is copied to the host on the loop (a
  // snapshot); a periodic one is then written by a thread of its own while the job trains on and
  // the loop serves. At the 8B shape on an H100 a checkpoint held the loop 0.12 s so, against
  // 0.94 s with its files written and synced there (every stream paused for them). One write at
  // a time; kCheckpoint is reported at the first Step() between optimizer steps after it is
  // durable.
  using CheckpointSnapshot = trainer_impl::CheckpointSnapshot;
  struct CheckpointWrite {
    std::shared_ptr<const CheckpointSnapshot> snapshot;
    std::shared_ptr<const LoraAdapter> best;  // unsaved_best, written first; put back on failure
    std::future<absl::StatusOr<std::string>> path;
  };
  std::optional<CheckpointWrite> checkpoint_write;  // in flight
  // The newest checkpoint written, with the evaluation its state had seen: one of the same state
  // is not written again (a shutdown during the last evaluation wrote it, then its cancel did).
  struct WrittenCheckpoint {
    int64_t step = -1;
    int64_t last_eval_step = -1;
    std::string path;
  } written;
  // A periodic checkpoint's write failed for want of storage: the job holds still, and writes
  // its state (Checkpoint) once the wait is over.
  bool pending_checkpoint = false;
  std::function<void(int64_t)> checkpoint_write_gate;  // SetCheckpointWriteGateForTesting
  // The job's state now, on the host.
  std::shared_ptr<const CheckpointSnapshot> Snapshot();
  // unsaved_best, to disk (a checkpoint refers to it, so it goes first).
  absl::Status WriteUnsavedBest();
  // The cadence's checkpoint (and the end's): waits for the one in flight, then starts writing
  // this one.
  absl::Status StartCheckpoint();
  // Whether the job's state now is on disk, its best adapter with it.
  bool StateWritten() const {
    return !unsaved_best && written.step == state.step &&
           written.last_eval_step == state.last_eval_step;
  }
  // "the last checkpoint (step N)" for the end's, "the checkpoint of step N" otherwise.
  std::string CheckpointName(int64_t step) const;
  // The job's end waits for a write on its thread (its last checkpoint, its adapter): Step()
  // would find nothing to do.
  bool WaitsForItsWrite() const;
  // Trainer::idle_until's answer.
  std::optional<trainer_impl::Clock::time_point> IdleUntil() const;
  // As the job ends: the adapter's write, if one is in flight, waited for.
  void SettleAdapterWrite() {
    if (finishing && finishing->adapter_write.valid()) (void)finishing->adapter_write.get();
  }
  // The write in flight, once done (`wait`: waits for it): reports it, or on a storage failure
  // sets pending_checkpoint and starts the wait; other errors are returned. Called between
  // optimizer steps only.
  absl::Status CollectCheckpointWrite(bool wait);
  // The write in flight, waited for and taken (its snapshot into *snapshot); kCheckpoint reported
  // when it went through.
  absl::StatusOr<std::string> TakeCheckpointWrite(
      std::shared_ptr<const CheckpointSnapshot>* snapshot);
  // As the job ends (finished, cancelled, failed): waits for the write in flight and reports it,
  // or warns that it was not written.
  void SettleCheckpointWrite();
  // This run's training time so far: since the job started here, less its waits for storage.
  double RunSeconds() const {
    const auto now = trainer_impl::Clock::now();
    double waiting = seconds_waited;
    if (storage_wait) waiting += trainer_impl::Seconds(now - storage_wait->since);
    return trainer_impl::Seconds(now - job_start) - waiting;
  }
  // A write went through: the wait (if any) is over; `all` when nothing else waits behind it
  // (the next failure then waits the shortest time again).
  void EndStorageWait(bool all) {
    if (storage_wait) {
      seconds_waited += trainer_impl::Seconds(trainer_impl::Clock::now() - storage_wait->since);
      storage_wait.reset();
    }
    if (all) storage_failures = 0;
  }
  // `written`'s storage failure starts (or prolongs) the wait and returns OK; its success ends
  // it; any other error is returned (the job fails).
  absl::Status RetryIfNotWritten(const absl::Status& written, const std::string& what) {
    if (written.ok()) {
      EndStorageWait(/*all=*/true);
      return written;
    }
    if (!IsStorageFailure(written)) return written;
    const int failures = ++storage_failures;
    const double wait =
        std::min(config.storage_retry_max_s,
                 config.storage_retry_s * std::pow(2.0, std::min(failures - 1, 20)));
    const auto now = trainer_impl::Clock::now();
    storage_wait = StorageWait{now + std::chrono::duration_cast<trainer_impl::Clock::duration>(
                                         std::chrono::duration<double>(wait)),
                               storage_wait ? storage_wait->since : now};
    Warn(absl::StrCat(
        what, " could not be written: ", written.message(),
        "; the job holds what it trained and tries again in ",
        static_cast<int64_t>(std::ceil(wait)),
        " s (free disk space, or make the folder writable; cancelling the job ends it)"));
    return absl::OkStatus();
  }
  absl::Status Fail(absl::Status status) {
    SettleCheckpointWrite();
    SettleAdapterWrite();
    WriteBestBeforeTheEnd();
    done = true;
    TrainingEvent e;
    e.kind = TrainingEvent::Kind::kFailed;
    e.error = std::string(status.message());
    Emit(e);
    return status;
  }
};

}  // namespace lorad::engine
