// Engine: what the daemon holds of the ML side. It loads the base model once (NF4 on the device),
// its tokenizer and chat template, owns the adapter store, the inference engine and the training
// job in progress, and runs the one GPU loop thread that does every device operation
// (DESIGN.md, "runtime").
//
// The GPU loop, each iteration:
//   1. an inference step (InferenceEngine::Step) while any request is queued or running;
//   2. training micro-batches while a job is active: all of the device when nothing is served,
//      else enough that training gets at least `train_share` of the loop's time (inference
//      first: a micro-batch runs only once the inference steps have earned it the time). Up to
//      `max_training_jobs` jobs train at once, one micro-batch each in turn.
//   It sleeps when there is nothing to do and wakes on the next submission.
//
// A job's dataset is read and tokenized on a thread of its own before the loop builds its trainer
// (Trainer::PrepareData), so serving goes on meanwhile.
//
// torch-free header (pimpl): the server includes it. Thread rules: every public method is
// thread-safe and returns quickly, except Stop (joins the loop). Callbacks (token events,
// training events) run on the loop thread and must only queue and return.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/infer/generation_request.h"
#include "engine/infer/inference_engine.h"
#include "engine/lora/adapter_store.h"
#include "engine/model/chat_template.h"
#include "engine/model/model_config.h"
#include "engine/runtime/device_info.h"
#include "engine/train/training_event.h"
#include "engine/train/training_job_config.h"

namespace lorad::engine {

class Tokenizer;

struct EngineOptions {
  std::string model_folder;
  std::string device = "auto";       // auto | cpu | cuda | cuda:N
  std::string base_weights = "nf4";  // nf4 (4-bit base, as QLoRA) | none (keep 16/32-bit)
  std::string chat_template;         // a template name; "" = the model folder's own
  InferenceEngineOptions inference;
  int32_t max_resident_adapters = 8;
  // Lower bound on training's share of the loop's time while both train and serve (0..0.95).
  double train_share = 0.3;
  // Training jobs active at once (>= 1); they share training's time, micro-batch by micro-batch.
  int32_t max_training_jobs = 1;
  // Memory the active training jobs may hold together, by their EstimateTrainingBytes
  // (engine/train/training_memory.h), beside the base model and the KV cache; 0 = no budget. On
  // CUDA the device's free memory is checked as well when a job starts.
  int64_t training_memory_budget_bytes = 0;
};

struct EngineStats {
  InferenceStats inference;
  int32_t adapters_resident = 0;
  int64_t adapter_device_bytes = 0;
  int64_t adapter_stack_bytes = 0;  // the inference engine's adapter tables (InferenceStats)
  int64_t base_bytes = 0;
  int64_t kv_cache_bytes = 0;
  bool training = false;
  std::vector<std::string> training_job_ids;  // active jobs, in the order they started
  // Of them, those not handed to the loop yet: reading and tokenizing their data (or just done).
  int32_t training_jobs_preparing = 0;
  double train_seconds = 0;      // loop time spent on training since start
  double inference_seconds = 0;  // loop time spent on inference steps since start
};

// Called on the loop thread for every event of a training job; the last is kFinished (also when
// cancelled) or kFailed.
using TrainingEventCallback = std::function<void(const TrainingEvent&)>;

class Engine {
 public:
  // Loads the model folder and starts the loop. Errors name the folder and what is wrong.
  static absl::StatusOr<std::unique_ptr<Engine>> Start(const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Cancels running requests and the training job (which writes its checkpoint), then stops
  // the loop. Idempotent.
  void Stop();

  // ---- serving ----
  absl::StatusOr<RequestId> Generate(GenerationRequest request, TokenCallback on_token);
  void Cancel(RequestId id);
  // The prompt's token ids for a conversation, with the template `name` ("" = the model's own),
  // and the text that ends the assistant's turn in that template (generation stops there). With
  // `continue_final_message` the prompt continues the last message, an assistant's
  // (ChatTemplate::RenderContinuing), instead of opening a new reply.
  struct RenderedChat {
    std::vector<int32_t> prompt_ids;  // encoded as training encodes it (ChatTemplate::Encode)
    std::string end_of_turn;
  };
  absl::StatusOr<RenderedChat> RenderChat(const std::vector<ChatMessage>& messages,
                                          const std::string& name,
                                          bool continue_final_message = false) const;
  // What the model's own chat template writes that lorad's rendering of it leaves out, for a
  // warning at start-up ("" when nothing known; ChatTemplate::unrendered).
  std::string chat_template_note() const;
  AdapterStore& adapters();

  // ---- training ----
  // The memory planner's answer for a job with `config` under training_memory_budget_bytes:
  // true when it fits beside the active jobs now; false when it fits only once some of them end
  // (keep it queued); RESOURCE_EXHAUSTED, saying how much it needs, when it cannot fit even alone
  // (in the budget, or, offloading on CUDA, in the host's memory: TrainingMemoryEstimate's
  // host_bytes against TotalHostBytes()).
  // `waits_for` (optional): when false, what the job needs that the jobs training hold.
  absl::StatusOr<bool> TrainingFitsNow(const TrainingJobConfig& config,
                                       std::string* waits_for = nullptr) const;
  // Whether starting a job with `candidate` now can never hold back `waiting`, a job that waits
  // for memory (TrainingFitsNow false), however the active jobs end: for every set of them beside
  // which `waiting` would fit with a slot of `max_jobs` left, it also fits beside that set and the
  // candidate with a slot left. (The largest such set decides: what the candidate takes must be
  // memory `waiting` could never have used.) Errors as TrainingFitsNow's.
  absl::StatusOr<bool> TrainingLeavesRoomFor(const TrainingJobConfig& waiting,
                                             const TrainingJobConfig& candidate,
                                             int max_jobs) const;
  // What starting a job with `config` would refuse about its data (the template cannot take a
  // record, no usable example), from at most `max_records` records of each file; for a check at
  // submission. Thread-safe; it reads the files and tokenizes on the caller's thread. CANCELLED
  // soon after `*abandon` turns true.
  absl::Status CheckTrainingData(const TrainingJobConfig& config, int64_t max_records,
                                 const std::atomic<bool>* abandon = nullptr) const;
  // Starts a job: validates the config, reads the dataset, resumes from the last checkpoint in
  // config.output_dir if one is there. FailedPrecondition while max_training_jobs jobs are
  // active, or when job_id is one of them; RESOURCE_EXHAUSTED when it does not fit the training
  // memory budget now (TrainingFitsNow).
  absl::Status StartTraining(const std::string& job_id, const TrainingJobConfig& config,
                             TrainingEventCallback on_event);
  // For a shutdown: every active job finishes its optimizer step, saves a checkpoint it resumes
  // from at the next start and ends (kFinished with summary.cancelled), while serving goes on;
  // later StartTraining calls are UNAVAILABLE. Blocks until the jobs have ended; returns how
  // many were active.
  int StopTraining();
  // Asks the active job `job_id` to stop at its next micro-batch; it reports kFinished with
  // summary.cancelled.
  void CancelTraining(const std::string& job_id);
  bool TrainingActive() const;  // any job

  const ModelConfig& model_config() const;
  const DeviceInfo& device() const;
  const Tokenizer& tokenizer() const;
  // What the model folder held at start (ModelFolderFingerprint): config, tokenizer, weights.
  const std::string& base_fingerprint() const;
  EngineStats Stats() const;

  struct Impl;

 private:
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lorad::engine
