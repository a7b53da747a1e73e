// Trainer: one QLoRA supervised fine-tuning job, stepped one micro-batch at a time by the GPU
// loop so training interleaves with inference on the one shared base model.
//
// torch-free header (pimpl): the runtime and the server include it; the model and tokenizer are
// only forward-declared.
//
// Life of a job:
//   auto trainer = Trainer::Create(model, tokenizer, model_folder, config, on_event);
//   while (!trainer->done()) { if (auto s = trainer->Step(); !s.ok()) break; /* + inference */ }
// Create reads and tokenizes the dataset, initialises the adapter (PEFT's init, or
// config.init_adapter_path) and, with config.resume, continues from the newest checkpoint in
// config.output_dir. Each Step() runs one micro-batch (forward with LoRA, chunked cross entropy,
// backward into the LoRA weights only); the grad_accum-th micro-batch of an optimizer step also
// clips the gradient norm, steps the optimizer at the schedule's rate and emits a kStep event.
// The work after a step comes in pieces, one per Step() call, so that the GPU loop serves
// between them: an evaluation (eval_every) one validation micro-batch a call, then the
// checkpoint (save_every: copied to the host there, its files written and synced by a thread of
// its own while the job trains on; kCheckpoint comes at the first Step() between optimizer steps
// after they are durable, and the next checkpoint waits for them); after the last step, the last
// evaluation, the final checkpoint, the held-out answers (one forward a call, for a group of
// them: their prompts, or a token of each), then <output_dir>/adapter/ and kFinished.
//
// Loss: per optimizer step, the token-weighted mean over all its micro-batches (the sum of token
// losses / the step's trained tokens), as transformers' Trainer computes it with gradient
// accumulation (num_items_in_batch); each micro-batch backpropagates its share.
//
// Errors: Step() returns the error and emits kFailed once; the trainer is then done(). libtorch
// exceptions never escape.
//
// Thread rules: Create, Step, SaveCheckpoint and the accessors run on the GPU loop thread;
// PrepareData on any thread; Cancel and Interrupt may be called from any thread. Events are
// delivered on the thread that calls Step(). The model and tokenizer must outlive the trainer.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/train/training_event.h"
#include "engine/train/training_job_config.h"

namespace lorad::engine {

class LlamaModel;
class Tokenizer;

class Trainer {
 public:
  using EventCallback = std::function<void(const TrainingEvent&)>;

  // `model_folder` supplies the chat template and the EOS token; errors name the config field,
  // the dataset file:line, or the checkpoint file at fault. PrepareData, then Create with it.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const LlamaModel& model,
                                                         const Tokenizer& tokenizer,
                                                         const std::string& model_folder,
                                                         const TrainingJobConfig& config,
                                                         EventCallback on_event);
  // A job's dataset, read, formatted and tokenized (and fingerprinted, for its resume check),
  // and the checkpoint it resumes from or the adapter it continues, read: the part of Create
  // that uses no device and takes the longest (seconds for tens of thousands of records; a large
  // model's optimizer state is hundreds of MB), so the runtime runs it on a thread of its own
  // while the GPU loop goes on serving. Thread-safe. CANCELLED as soon as `*abandon` turns true.
  struct PreparedData;
  static absl::StatusOr<std::shared_ptr<PreparedData>> PrepareData(
      const LlamaModel& model, const Tokenizer& tokenizer, const std::string& model_folder,
      const TrainingJobConfig& config, const std::atomic<bool>* abandon = nullptr);
  // The rest of Create (the adapter and the optimizer on the device, from what PrepareData read),
  // on the GPU loop thread, with what PrepareData made of the same config.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const LlamaModel& model,
                                                         const Tokenizer& tokenizer,
                                                         const std::string& model_folder,
                                                         std::shared_ptr<PreparedData> data,
                                                         EventCallback on_event);
  // InvalidArgument for export_merged on a base the folder holds quantized by bitsandbytes: there
  // is no 16-bit model to merge into (PrepareData and CheckData refuse such a job).
  static absl::Status CheckMergedExport(const LlamaModel& model, const std::string& model_folder,
                                        const TrainingJobConfig& config);
  // What Create would refuse about the data (TrainingData::Check, at most `max_records` records
  // of each file), and a merged export it cannot write, without building anything: for a check
  // when a job is submitted.
  static absl::Status CheckData(const LlamaModel& model, const Tokenizer& tokenizer,
                                const std::string& model_folder, const TrainingJobConfig& config,
                                int64_t max_records, const std::atomic<bool>* abandon = nullptr);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Runs one micro-batch (see above). After Cancel(), the next Step() ends the job: kFinished
  // with summary.cancelled, no checkpoint. A Step() on a done trainer is FailedPrecondition.
  absl::Status Step();
  // Steps until done (tests, tools).
  absl::Status Run();
  // Thread-safe; takes effect at the next Step().
  void Cancel();
  // Thread-safe: a periodic evaluation in progress (or the next one) stops at its next batch and
  // is skipped, so that a Step() under way returns soon: the daemon's shutdown then checkpoints
  // the job without that evaluation (it may take minutes on a large validation split).
  void Interrupt();

  // At an optimizer-step boundary (always true between Step() calls with grad_accum 1): writes
  // a checkpoint now (the daemon's drain on SIGTERM) and returns its folder.
  absl::StatusOr<std::string> SaveCheckpoint();
  bool at_step_boundary() const;
  // Set while a write that failed waits to be tried again (a full disk: see
  // TrainingJobConfig::storage_retry_s), and while the job's end waits for its last checkpoint
  // or its adapter to be written (a few ms ahead: the loop looks again then): until then Step()
  // does no work, so the loop may leave the job be. Unset once cancelled (the next Step() ends
  // it).
  std::optional<std::chrono::steady_clock::time_point> idle_until() const;

  // Tests: `gate` runs on the writing thread before each checkpoint written there (the cadence's,
  // the end's) is written, with its step (it may hold the write in flight).
  void SetCheckpointWriteGateForTesting(std::function<void(int64_t step)> gate);

  bool done() const;
  bool cancelled() const;       // Cancel() was called
  int64_t step() const;         // optimizer steps completed (resumed runs count from the start)
  int64_t total_steps() const;  // planned optimizer steps
  int64_t train_rows() const;   // training rows after split and packing
  int64_t validation_rows() const;
  bool resumed() const;  // Create continued from a checkpoint

 private:
  struct Impl;
  explicit Trainer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lorad::engine
