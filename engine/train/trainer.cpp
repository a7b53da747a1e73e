#include "engine/train/trainer.h"

#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <future>
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
#include "engine/train/training_checkpoint.h"
#include "engine/train/training_data.h"

namespace lorad::engine {
namespace {

using Clock = std::chrono::steady_clock;

// The held-out examples the report answers for ROUGE (the first ones with a prompt): greedy
// answers on the training job's turn of the GPU loop, so a bounded number.
constexpr int64_t kAnsweredExamples = 32;
constexpr int64_t kAnswerTokens = 128;  // the longest answer

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The formatter a job's examples go through. A model with a sliding window is exact only on
// sequences that fit in it (ModelConfig): config.max_seq_length is capped at the window.
absl::StatusOr<ExampleFormatter> FormatterFor(const LlamaModel& model, const Tokenizer& tokenizer,
                                              const std::string& model_folder,
                                              TrainingJobConfig& config) {
  ExampleFormatterOptions fo;
  fo.template_name = config.data.template_name;
  fo.model_chat_template = config.data.model_chat_template;
  fo.response_only = config.data.response_only;
  const int64_t window = model.config().sliding_window;
  if (window > 0 && config.max_seq_length > window) config.max_seq_length = window;
  fo.max_seq_length = config.max_seq_length;
  return ExampleFormatter::Create(tokenizer, model_folder, fo);
}

// The files a job reads: its dataset, and its validation file when it has one.
std::vector<std::string> DatasetFiles(const TrainingJobConfig& config) {
  std::vector<std::string> files = {config.data.path};
  if (!config.data.validation_path.empty()) files.push_back(config.data.validation_path);
  return files;
}

}  // namespace

struct Trainer::PreparedData {
  TrainingJobConfig config;  // as given, max_seq_length capped at the model's sliding window
  std::string end_of_turn;   // the chat template's, where evaluated answers end
  std::string dataset_fingerprint;
  std::optional<TrainingData> data;
};

struct Trainer::Impl {
  const LlamaModel* model = nullptr;
  const Tokenizer* tokenizer = nullptr;
  std::string end_of_turn;  // the chat template's, where evaluated answers end
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
  bool done = false;
  std::atomic<bool> cancel{false};
  std::atomic<bool> interrupt{false};  // Interrupt(): skip periodic evaluations

  // The optimizer step in progress.
  int64_t micro_in_step = 0;  // micro-batches of this step already run
  int64_t step_micro = 0;     // micro-batches in this step
  int64_t step_tokens = 0;    // trained tokens over the whole step: the loss's denominator
  int64_t step_input_tokens = 0;
  torch::Tensor step_loss_sum;  // the step's summed token losses so far, on the device, fp64
  Clock::time_point step_start;
  Clock::time_point job_start = Clock::now();
  double seconds_before_this_run = 0;  // a resumed job's time up to its checkpoint
  int64_t steps_this_run = 0;
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
    enum class Stage { kLastEval, kBestEval, kAnswers, kFiles } stage = Stage::kLastEval;
    bool early_stopped = false;
    EvalProgress eval;
    bool best_loaded = false;
    std::optional<EvalMetrics> scored;  // the evaluation of the weights the job publishes
    int64_t scored_step = 0;
    size_t next_answer_row = 0;
    std::optional<ExampleAnswerer> answering;  // the held-out example being answered
    AnswerEvaluation answers;
    bool files_written = false;  // the report and the adapter; the merged export may go on
    std::future<absl::Status> merged_export;
    // Set when a shutdown stops the job during its export: the export gives up (minutes for a
    // large model, past a container's stop timeout); the job resumes at its end next time.
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
  // Reports an evaluation and keeps the best (with load_best_at_end also its adapter, on disk,
  // so a resumed job still has it); returns whether it improved on the best.
  absl::StatusOr<bool> ReportEvaluation(const EvalMetrics& eval) {
    last_eval = eval;
    state.last_eval_step = eval.step;
    TrainingEvent ev;
    ev.kind = TrainingEvent::Kind::kEval;
    ev.eval = eval;
    Emit(ev);
    if (state.has_eval && eval.loss >= state.best_eval_loss) return false;
    state.best_eval_loss = eval.loss;
    state.best_eval_step = eval.step;
    state.has_eval = true;
    if (config.load_best_at_end) {
      if (auto s = adapter.HostCopy().WritePeft(BestAdapterPath()); !s.ok()) return s;
    }
    return true;
  }
  // Cancelled: ends now. Else starts the finishing stages (ContinueFinishing ends the job).
  absl::Status Finish(bool cancelled, bool early_stopped);
  absl::Status EmitFinished(bool cancelled, bool early_stopped, TrainingSummary summary);
  std::string BestAdapterPath() const {
    return (std::filesystem::path(config.output_dir) / "best-adapter").string();
  }
  absl::StatusOr<std::string> Checkpoint();
  void Emit(const TrainingEvent& e) {
    if (on_event) on_event(e);
  }
  absl::Status Fail(absl::Status status) {
    done = true;
    TrainingEvent e;
    e.kind = TrainingEvent::Kind::kFailed;
    e.error = std::string(status.message());
    Emit(e);
    return status;
  }
};

absl::Status Trainer::Impl::Init(const Tokenizer& tokenizer, const std::string& model_folder,
                                 PreparedData prepared) {
  this->model_folder = model_folder;
  this->tokenizer = &tokenizer;
  end_of_turn = std::move(prepared.end_of_turn);
  data = std::move(prepared.data);
  per_epoch = data->MicroBatchesPerEpoch(config.micro_batch_size);
  total_steps = config.max_steps > 0
                    ? config.max_steps
                    : TrainingStepsForEpochs(config.num_epochs, per_epoch, config.grad_accum);
  auto kind = LrScheduleKindFromName(config.schedule);
  if (!kind.ok()) return kind.status();
  const int64_t warmup =
      config.warmup_ratio > 0
          ? static_cast<int64_t>(std::ceil(config.warmup_ratio * static_cast<double>(total_steps)))
          : config.warmup_steps;
  schedule.emplace(*kind, config.learning_rate, warmup, total_steps);

  std::optional<TrainingCheckpoint> checkpoint;
  if (config.resume) RemoveLeftovers(config.output_dir);  // of a process killed mid-write
  const std::string latest = config.resume ? LatestCheckpoint(config.output_dir) : "";
  if (!latest.empty()) {
    auto c = ReadCheckpoint(latest);
    if (!c.ok()) return c.status();
    checkpoint = *std::move(c);
    adapter = checkpoint->adapter;
    state = checkpoint->state;
    seconds_before_this_run = state.train_seconds;
    resumed = true;
    resumed_from = latest;
  } else if (!config.init_adapter_path.empty()) {
    auto a = LoraAdapter::ReadPeft(config.init_adapter_path);
    if (!a.ok()) return a.status();
    if (a->from_patterns) {
      return absl::InvalidArgumentError(absl::StrCat(
          "init_adapter_path: ", config.init_adapter_path,
          " has per-module ranks or alphas (rank_pattern / alpha_pattern): lorad serves such "
          "adapters but does not train them further"));
    }
    adapter = *std::move(a);
  } else {
    LoraConfig lora = config.lora;
    lora.base_model_name_or_path = model_folder;
    auto a = LoraAdapter::Init(model->config(), lora, config.seed);
    if (!a.ok()) return a.status();
    adapter = *std::move(a);
  }
  // A fresh job's randomness (LoRA dropout) follows its seed, as transformers' set_seed; a
  // resumed one continues the checkpoint's generator state (taken below).
  if (!checkpoint) torch::manual_seed(config.seed);
  const std::string& fingerprint = prepared.dataset_fingerprint;
  if (checkpoint && !state.dataset_fingerprint.empty() &&
      state.dataset_fingerprint != fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the dataset (", absl::StrJoin(DatasetFiles(config), ", "),
        ") changed since the job started: ", resumed_from,
        " was trained on other contents, and resuming would train the rest of the "
        "job on other examples; put the original file back to resume, or submit a new job"));
  }
  state.dataset_fingerprint = fingerprint;
  if (auto s = adapter.ValidateAgainst(model->config()); !s.ok()) return s;
  // fp32 master weights on the model's device: the optimizer updates these; the forward casts
  // them to the compute dtype (bf16 on CUDA) with autograd through the cast.
  for (auto& [name, pair] : adapter.layers) {
    pair.a = pair.a.detach()
                 .to(model->options().device, torch::kFloat)
                 .contiguous()
                 .requires_grad_(true);
    pair.b = pair.b.detach()
                 .to(model->options().device, torch::kFloat)
                 .contiguous()
                 .requires_grad_(true);
    params.push_back(pair.a);
    params.push_back(pair.b);
  }
  auto okind = OptimizerKindFromName(config.optimizer);
  if (!okind.ok()) return okind.status();
  OptimizerOptions oo;
  oo.beta1 = config.adam_beta1;
  oo.beta2 = config.adam_beta2;
  oo.eps = config.adam_eps;
  oo.weight_decay = config.weight_decay;
  auto opt = MakeOptimizer(*okind, params, oo);
  if (!opt.ok()) return opt.status();
  optimizer = *std::move(opt);
  if (checkpoint) {
    if (auto s = optimizer->LoadState(checkpoint->optimizer); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("checkpoint ", latest, ": ", s.message()));
    }
    // A checkpoint at the last step (the end writes one before the adapter): Step() only ends it.
    // One a shutdown wrote before its step's cadence evaluation (skipped, not waited for): that
    // evaluation runs first, so that its loss counts for the best and for early stopping. (The
    // last step's is the end's own: Finish sees to it.) Older checkpoints do not say (-1).
    if (config.eval_every > 0 && state.step > 0 && state.step < total_steps &&
        state.step % config.eval_every == 0 && state.last_eval_step >= 0 &&
        state.last_eval_step != state.step && !data->validation().empty()) {
      periodic_eval.emplace();
    }
  }
  // The job's stream: its seed's (set above) or the checkpoint's CPU state.
  random = RandomState::Capture(model->options().device.is_cuda());
  if (checkpoint && checkpoint->rng.cpu.defined()) random.cpu = checkpoint->rng.cpu;
  // The CUDA generator's too when both runs are on a GPU (the dropout masks are drawn there).
  if (checkpoint && checkpoint->rng.cuda.defined() && random.cuda_device >= 0) {
    random.cuda = checkpoint->rng.cuda;
  }
  return absl::OkStatus();
}

void Trainer::Impl::PlanStep() {
  // As transformers' Trainer: a step never runs into the next epoch, so an epoch whose
  // micro-batches grad_accum does not divide ends with a shorter step.
  step_micro = std::min(config.grad_accum, per_epoch - state.micro_batches % per_epoch);
  step_tokens = 0;
  step_input_tokens = 0;
  step_loss_sum = torch::Tensor();
  for (int64_t k = 0; k < step_micro; ++k) {
    for (int64_t i : data->MicroBatch(state.micro_batches + k, config.micro_batch_size)) {
      step_tokens += data->train()[i].TrainedTokens();
    }
  }
  step_start = Clock::now();
}

absl::Status Trainer::Impl::StepOrThrow() {
  if (micro_in_step == 0) PlanStep();
  const std::vector<int64_t> rows = data->MicroBatch(state.micro_batches, config.micro_batch_size);
  MicroBatchTensors mb = MakeBatch(data->train(), rows);
  ForwardOptions fo;
  fo.adapter = &adapter;
  fo.train = true;
  fo.hidden_states = true;
  fo.checkpoint_layers = config.gradient_checkpointing;
  fo.offload_checkpoints = config.offload_activations;
  fo.checkpoint_skip_last = config.keep_activations_layers;
  auto hidden = model->Forward(mb.batch, nullptr, fo);  // [B, T, hidden]
  if (!hidden.ok()) return hidden.status();
  const torch::Tensor flat = hidden->reshape({-1, hidden->size(2)});
  const torch::Tensor loss_sum = ChunkedCrossEntropySum(flat, model->lm_head(), mb.targets,
                                                        config.loss_chunk_tokens, kIgnoreLabel);
  // Each micro-batch's share of the step's token-weighted mean.
  (loss_sum / static_cast<double>(std::max<int64_t>(1, step_tokens))).backward();
  // Summed on the device and read once the step's optimizer update is enqueued: a read here
  // would leave the GPU idle while the host launches the update.
  const torch::Tensor micro_loss = loss_sum.detach().to(torch::kDouble);
  step_loss_sum = step_loss_sum.defined() ? step_loss_sum + micro_loss : micro_loss;
  step_input_tokens += mb.input_tokens;
  ++state.micro_batches;
  ++micro_in_step;
  if (micro_in_step < step_micro) return absl::OkStatus();
  micro_in_step = 0;
  return FinishStep();
}

absl::Status Trainer::Impl::FinishStep() {
  // torch.nn.utils.clip_grad_norm_: total = ||(||g_i||)||, coef = max / (total + 1e-6) <= 1.
  torch::Tensor grad_norm_device;
  {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> grads;
    for (const torch::Tensor& p : params) {
      if (p.grad().defined()) grads.push_back(p.grad());
    }
    if (!grads.empty()) {
      // The multi-tensor kernels, as clip_grad_norm_ takes on CUDA: a few launches for the
      // adapter's 448 tensors (8B, all seven projections) instead of two each.
      const torch::Tensor total = torch::stack(at::_foreach_norm(grads, 2)).norm(2);
      grad_norm_device = total;
      if (config.max_grad_norm > 0) {
        const torch::Tensor coef = torch::clamp_max(config.max_grad_norm / (total + 1e-6), 1.0);
        at::_foreach_mul_(grads, coef);
      }
    }
  }
  const double lr = schedule->LearningRate(state.step);
  if (auto s = optimizer->Step(lr); !s.ok()) return s;
  optimizer->ZeroGrad();
  // The host reads the step's figures only now, after the update is enqueued (each read waits
  // for the device).
  const double grad_norm = grad_norm_device.defined() ? grad_norm_device.item<double>() : 0.0;
  const double loss_sum = step_loss_sum.defined() ? step_loss_sum.item<double>() : 0.0;
  ++state.step;
  ++steps_this_run;
  state.trained_tokens += step_input_tokens;
  const double loss = loss_sum / static_cast<double>(std::max<int64_t>(1, step_tokens));
  state.last_loss = loss;
  state.loss_sum += loss;
  state.best_train_loss = state.step == 1 ? loss : std::min(state.best_train_loss, loss);

  const auto now = Clock::now();
  TrainingEvent e;
  e.kind = TrainingEvent::Kind::kStep;
  StepMetrics& m = e.step;
  m.step = state.step;
  m.total_steps = total_steps;
  m.epoch = static_cast<double>(state.micro_batches) / static_cast<double>(per_epoch);
  m.loss = loss;
  m.learning_rate = lr;
  m.grad_norm = grad_norm;
  m.tokens = step_input_tokens;
  m.step_time_s = Seconds(now - step_start);
  m.tokens_per_s = m.step_time_s > 0 ? static_cast<double>(step_input_tokens) / m.step_time_s : 0;
  // A resumed job's time goes on from its checkpoint's (as the summary's runtime does); the
  // ETA is from this run's pace.
  m.elapsed_s = seconds_before_this_run + Seconds(now - job_start);
  m.eta_s = Seconds(now - job_start) / static_cast<double>(steps_this_run) *
            static_cast<double>(total_steps - state.step);
  Emit(e);
  if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
    // The update just applied was not finite either: every later step, checkpoint and the
    // adapter would carry it. Stop here; the checkpoints written so far stay.
    return absl::FailedPreconditionError(absl::StrCat(
        "training diverged at step ", state.step, ": the loss is ", loss, " and the gradient norm ",
        grad_norm, "; lower training.learning_rate (", config.learning_rate, ") or lora.alpha (",
        config.lora.alpha, ")",
        config.max_grad_norm > 0 ? "" : ", or set training.max_grad_norm (clipping is off)"));
  }

  if (config.eval_every > 0 && state.step % config.eval_every == 0 && !data->validation().empty() &&
      !interrupt.load()) {
    periodic_eval.emplace();  // the next Step() calls go to it
    return absl::OkStatus();
  }
  return AfterStep(/*early_stop=*/false);
}

absl::Status Trainer::Impl::AfterStep(bool early_stop) {
  // Patience that runs out on the last step stopped nothing: the job ran every step.
  if (state.step >= total_steps) return Finish(false, /*early_stopped=*/false);
  if (early_stop) return Finish(false, /*early_stopped=*/true);
  if (config.save_every > 0 && state.step % config.save_every == 0) {
    auto path = Checkpoint();
    if (!path.ok()) return path.status();
  }
  return absl::OkStatus();
}

absl::Status Trainer::Impl::ContinuePeriodicEvaluation() {
  // Interrupt(): skipped, and so is what followed it; the next Step() ends the job if it was
  // the last step.
  if (interrupt.load()) {
    periodic_eval.reset();
    return absl::OkStatus();
  }
  auto complete = EvaluateSome(*periodic_eval);
  if (!complete.ok()) return complete.status();
  if (!*complete) return absl::OkStatus();
  const EvalMetrics eval = EvaluationOf(*periodic_eval);
  periodic_eval.reset();
  auto improved = ReportEvaluation(eval);
  if (!improved.ok()) return improved.status();
  bool early_stop = false;
  if (*improved) {
    state.evals_without_improvement = 0;
  } else {
    ++state.evals_without_improvement;
    early_stop = config.early_stopping_patience > 0 &&
                 state.evals_without_improvement >= config.early_stopping_patience;
  }
  return AfterStep(early_stop);
}

absl::StatusOr<bool> Trainer::Impl::EvaluateSome(EvalProgress& progress) {
  torch::NoGradGuard no_grad;
  const auto& rows = data->validation();
  if (progress.next_row < rows.size()) {
    ForwardOptions fo;
    fo.adapter = &adapter;
    fo.hidden_states = true;
    std::vector<int64_t> idx;
    const size_t end =
        std::min(rows.size(), progress.next_row + static_cast<size_t>(config.micro_batch_size));
    for (size_t i = progress.next_row; i < end; ++i) {
      idx.push_back(static_cast<int64_t>(i));
      progress.tokens += rows[i].TrainedTokens();
    }
    MicroBatchTensors mb = MakeBatch(rows, idx);
    auto hidden = model->Forward(mb.batch, nullptr, fo);
    if (!hidden.ok()) return hidden.status();
    progress.sum += ChunkedCrossEntropySum(hidden->reshape({-1, hidden->size(2)}), model->lm_head(),
                                           mb.targets, config.loss_chunk_tokens, kIgnoreLabel)
                        .item<double>();
    progress.next_row = end;
  }
  return progress.next_row >= rows.size();
}

EvalMetrics Trainer::Impl::EvaluationOf(const EvalProgress& progress) const {
  EvalMetrics m;
  m.step = state.step;
  m.tokens = progress.tokens;
  m.loss = progress.sum / static_cast<double>(std::max<int64_t>(1, progress.tokens));
  return m;
}

absl::StatusOr<std::string> Trainer::Impl::Checkpoint() {
  state.train_seconds = seconds_before_this_run + Seconds(Clock::now() - job_start);
  // Called while the job steps: its stream is the one installed in the default generators.
  auto path = WriteCheckpoint(config.output_dir, adapter.HostCopy(), optimizer->SaveState(),
                              RandomState::Capture(model->options().device.is_cuda()), state,
                              config.keep_checkpoints);
  if (!path.ok()) return path.status();
  TrainingEvent e;
  e.kind = TrainingEvent::Kind::kCheckpoint;
  e.checkpoint = {state.step, *path};
  Emit(e);
  return path;
}

absl::Status Trainer::Impl::Finish(bool cancelled, bool early_stopped) {
  if (cancelled) return EmitFinished(true, early_stopped, TrainingSummary());
  if (!finishing) {
    finishing.emplace();
    finishing->early_stopped = early_stopped;
    finishing->scored_step = state.step;
  }
  return ContinueFinishing();
}

absl::Status Trainer::Impl::ContinueFinishing() {
  Finishing& f = *finishing;
  const bool validating = !data->validation().empty();
  // A stage returns after a piece of work (a validation micro-batch, a token of an answer), and
  // goes on to the next one when it has none left.
  if (f.stage == Finishing::Stage::kLastEval) {
    // The last step's evaluation counts for the best, and its event precedes the last
    // checkpoint's, as a cadence evaluation's does (and as a replayed history orders them). The
    // cadence's own is reused, not repeated.
    // Reported already when the job resumed from this step's checkpoint (written after it), not
    // when a shutdown interrupted the cadence's evaluation before it. A checkpoint of an older
    // lorad version does not say: then the cadence's was reported.
    const bool reported = state.last_eval_step >= 0
                              ? state.last_eval_step == state.step
                              : config.eval_every > 0 && state.step % config.eval_every == 0;
    if (validating && last_eval && last_eval->step == state.step) {
      f.scored = last_eval;
    } else if (validating) {
      auto complete = EvaluateSome(f.eval);
      if (!complete.ok()) return complete.status();
      if (!*complete) return absl::OkStatus();
      f.scored = EvaluationOf(f.eval);
      if (!reported) {
        if (auto st = ReportEvaluation(*f.scored); !st.ok()) return st.status();
      }
    }
    auto path = Checkpoint();  // the last step's weights: what a resume continues from
    if (!path.ok()) return path.status();
    f.stage = Finishing::Stage::kBestEval;
    f.eval = EvalProgress();
  }
  if (f.stage == Finishing::Stage::kBestEval) {
    // With load_best_at_end the best evaluation's adapter replaces the last step's weights, so
    // the held-out report scores, and the merged model holds, what the job publishes.
    if (config.load_best_at_end && state.has_eval && state.best_eval_step != state.step &&
        (f.best_loaded || std::filesystem::exists(BestAdapterPath()))) {
      if (!f.best_loaded) {
        auto best = LoraAdapter::ReadPeft(BestAdapterPath());
        if (!best.ok()) return best.status();
        if (auto st = adapter.CopyWeightsFrom(*best); !st.ok()) {
          return absl::DataLossError(absl::StrCat(
              BestAdapterPath(), " does not hold the job's LoRA weights: ", st.message(),
              " (was the folder changed?); delete it and resume, or submit the job again"));
        }
        f.best_loaded = true;
      }
      auto complete = EvaluateSome(f.eval);
      if (!complete.ok()) return complete.status();
      if (!*complete) return absl::OkStatus();
      f.scored = EvaluationOf(f.eval);
      f.scored->step = state.best_eval_step;  // the weights' step, not the job's
      f.scored_step = state.best_eval_step;
    }
    f.stage = validating ? Finishing::Stage::kAnswers : Finishing::Stage::kFiles;
  }
  if (f.stage == Finishing::Stage::kAnswers) {
    // One forward a piece: a group's prompts, then a token of each of its answers (up to 128).
    // A group's cache and prompts take about what a training micro-batch took.
    if (!f.answering && static_cast<int64_t>(f.answers.examples.size()) < kAnsweredExamples) {
      auto group = ExampleAnswerer::NextGroup(
          *model, data->validation(), &f.next_answer_row,
          kAnsweredExamples - static_cast<int64_t>(f.answers.examples.size()), kAnswerTokens,
          config.micro_batch_size * config.max_seq_length);
      if (!group.empty()) {
        auto started = ExampleAnswerer::Start(*model, *tokenizer, std::move(group), kAnswerTokens,
                                              end_of_turn);
        if (!started.ok()) return started.status();
        f.answering = *std::move(started);
      }
    }
    if (f.answering) {
      auto answered = f.answering->Advance(adapter);
      if (!answered.ok()) return answered.status();
      if (answered->has_value()) {
        for (AnsweredExample& e : **answered) f.answers.Add(std::move(e));
        f.answering.reset();
      }
      return absl::OkStatus();
    }
    f.stage = Finishing::Stage::kFiles;
  }
  TrainingSummary& s = f.summary;
  if (!f.files_written) {
    if (validating) {
      if (auto st = WriteEvaluationReport(config.output_dir, state.step, *f.scored,
                                          data->validation().size(), f.answers, s);
          !st.ok()) {
        return st;
      }
    }
    s.adapter_path = (std::filesystem::path(config.output_dir) / "adapter").string();
    s.adapter_step = f.scored_step;
    LoraAdapter final_adapter = adapter.HostCopy();
    if (auto st = final_adapter.WritePeft(s.adapter_path); !st.ok()) return st;
    if (!config.export_merged_dtype.empty()) {
      // Host work only (the base checkpoint's 16-bit weights plus B A, written out): for a
      // large model a minute of it, on a thread of its own while the loop serves.
      s.merged_path = (std::filesystem::path(config.output_dir) / "merged").string();
      f.merged_export =
          std::async(std::launch::async, [folder = model_folder, adapter = std::move(final_adapter),
                                          path = s.merged_path, dtype = config.export_merged_dtype,
                                          abandon = f.abandon_export] {
            return WriteMergedModel(folder, adapter, path, dtype, abandon.get());
          });
    }
    f.files_written = true;
  }
  if (f.merged_export.valid()) {
    if (f.merged_export.wait_for(std::chrono::milliseconds(2)) != std::future_status::ready) {
      return absl::OkStatus();
    }
    if (auto st = f.merged_export.get(); !st.ok()) return st;
  }
  return EmitFinished(false, f.early_stopped, std::move(s));
}

absl::Status Trainer::Impl::EmitFinished(bool cancelled, bool early_stopped, TrainingSummary s) {
  done = true;
  TrainingEvent e;
  e.kind = TrainingEvent::Kind::kFinished;
  s.steps = state.step;
  s.epochs = static_cast<double>(state.micro_batches) / static_cast<double>(per_epoch);
  // As transformers' train_runtime: the training loop (its evaluations and checkpoints included),
  // not the held-out answers and merged export after the last step's checkpoint.
  const bool past_training = finishing && finishing->stage != Finishing::Stage::kLastEval;
  s.runtime_s = past_training ? state.train_seconds
                              : seconds_before_this_run + Seconds(Clock::now() - job_start);
  s.trained_tokens = state.trained_tokens;
  s.final_loss = state.last_loss;
  s.train_loss = state.step > 0 && std::isfinite(state.loss_sum)
                     ? state.loss_sum / static_cast<double>(state.step)
                     : 0.0;
  s.best_is_eval = state.has_eval;
  s.best_loss = state.has_eval ? state.best_eval_loss : state.best_train_loss;
  s.cancelled = cancelled;
  s.early_stopped = early_stopped;
  s.skipped_records = data->skipped_records();
  s.dropped_examples = data->dropped();
  s.truncated_examples = data->truncated();
  e.summary = std::move(s);
  Emit(e);
  return absl::OkStatus();
}

Trainer::Trainer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Trainer::~Trainer() = default;

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const LlamaModel& model,
                                                         const Tokenizer& tokenizer,
                                                         const std::string& model_folder,
                                                         const TrainingJobConfig& config,
                                                         EventCallback on_event) {
  auto prepared = PrepareData(model, tokenizer, model_folder, config);
  if (!prepared.ok()) return prepared.status();
  return Create(model, tokenizer, model_folder, *std::move(prepared), std::move(on_event));
}

absl::StatusOr<std::shared_ptr<Trainer::PreparedData>> Trainer::PrepareData(
    const LlamaModel& model, const Tokenizer& tokenizer, const std::string& model_folder,
    const TrainingJobConfig& config, const std::atomic<bool>* abandon) {
  if (auto s = config.Validate(); !s.ok()) return s;
  auto prepared = std::make_shared<PreparedData>();
  prepared->config = config;
  TrainingJobConfig& c = prepared->config;
  auto formatter = FormatterFor(model, tokenizer, model_folder, c);
  if (!formatter.ok()) return formatter.status();
  prepared->end_of_turn = formatter->end_of_turn();
  // Fingerprinted before the read: a file changed during it then fails the next resume's check
  // rather than passing it with examples of two versions.
  auto fingerprint = FilesFingerprint(DatasetFiles(c), abandon);
  if (!fingerprint.ok()) return fingerprint.status();
  prepared->dataset_fingerprint = *std::move(fingerprint);
  auto built = TrainingData::Build(c.data, *formatter, c.max_seq_length, c.seed, abandon);
  if (!built.ok()) return built.status();
  prepared->data = *std::move(built);
  return prepared;
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const LlamaModel& model,
                                                         const Tokenizer& tokenizer,
                                                         const std::string& model_folder,
                                                         std::shared_ptr<PreparedData> data,
                                                         EventCallback on_event) {
  if (data == nullptr || !data->data.has_value()) {
    return absl::FailedPreconditionError("Trainer::Create: the job's data was not prepared");
  }
  auto impl = std::make_unique<Impl>();
  impl->model = &model;
  impl->config = data->config;
  impl->on_event = std::move(on_event);
  try {
    if (auto s = impl->Init(tokenizer, model_folder, std::move(*data)); !s.ok()) return s;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("setting up the training job failed: ", e.what_without_backtrace()));
  } catch (const std::exception& e) {  // e.g. the output folder's listing (filesystem_error)
    return absl::InternalError(absl::StrCat("setting up the training job failed: ", e.what()));
  }
  return std::unique_ptr<Trainer>(new Trainer(std::move(impl)));
}

absl::Status Trainer::CheckData(const LlamaModel& model, const Tokenizer& tokenizer,
                                const std::string& model_folder, const TrainingJobConfig& config,
                                int64_t max_records) {
  TrainingJobConfig checked = config;
  auto formatter = FormatterFor(model, tokenizer, model_folder, checked);
  if (!formatter.ok()) return formatter.status();
  return TrainingData::Check(checked.data, *formatter, max_records);
}

absl::Status Trainer::Step() {
  Impl& t = *impl_;
  if (t.done) return absl::FailedPreconditionError("the training job has already ended");
  // The job's own random stream for this step, kept for its next one whatever happens here.
  ScopedRandomState installed(t.random, t.model->options().device.is_cuda());
  try {
    // A shutdown (Interrupt, then Cancel) during the merged export: the export gives up and the
    // job ends unfinished; its last checkpoint is written, so the next start redoes its end.
    if (t.cancel.load() && t.interrupt.load() && t.finishing && t.finishing->files_written &&
        t.finishing->merged_export.valid() &&
        t.finishing->merged_export.wait_for(std::chrono::seconds(0)) !=
            std::future_status::ready) {  // one already written is kept: the job finishes
      t.finishing->abandon_export->store(true);
      (void)t.finishing->merged_export.get();
      return t.Finish(/*cancelled=*/true, false);
    }
    // Once its files are written the job is done but for the merged export: a user's cancel
    // then would report a written adapter as cancelled (the job finishes).
    if (t.cancel.load() && !(t.finishing && t.finishing->files_written)) {
      for (const torch::Tensor& p : t.params) p.mutable_grad() = torch::Tensor();
      // Trained to its last step, with that step's checkpoint not yet written (its evaluation
      // was under way, the end's or the cadence's): the checkpoint first, so that a cancel at
      // the end keeps what was trained (its adapter/ folder loads like any adapter).
      const bool last_step_unsaved =
          (t.finishing && t.finishing->stage == Impl::Finishing::Stage::kLastEval) ||
          (t.periodic_eval && t.state.step >= t.total_steps);
      if (last_step_unsaved) {
        if (auto path = t.Checkpoint(); !path.ok()) return t.Fail(path.status());
      }
      return t.Finish(/*cancelled=*/true, false);
    }
    if (!t.resumed_from.empty()) {
      // Reported again: a process killed between writing it and reporting it never did (the
      // job's history keeps one event per checkpoint).
      TrainingEvent resumed;
      resumed.kind = TrainingEvent::Kind::kCheckpoint;
      resumed.checkpoint = {t.state.step, t.resumed_from};
      t.resumed_from.clear();
      t.Emit(resumed);
    }
    absl::Status s;
    if (t.finishing) {
      s = t.ContinueFinishing();
    } else if (t.periodic_eval) {
      s = t.ContinuePeriodicEvaluation();
    } else if (t.micro_in_step == 0 && t.state.step >= t.total_steps) {
      // Resumed from the checkpoint its end writes first (the process stopped before the
      // adapter was written): nothing is left to train, only the end.
      s = t.Finish(false, false);
    } else if (t.micro_in_step == 0 && t.config.early_stopping_patience > 0 &&
               t.state.evals_without_improvement >= t.config.early_stopping_patience) {
      s = t.Finish(false, /*early_stopped=*/true);
    } else {
      s = t.StepOrThrow();
    }
    if (!s.ok()) return t.Fail(s);
  } catch (const c10::Error& e) {
    return t.Fail(absl::InternalError(
        absl::StrCat("training step ", t.state.step + 1, " failed: ", e.what_without_backtrace())));
  } catch (const std::exception& e) {  // e.g. a stream's failure on a full disk
    return t.Fail(absl::InternalError(
        absl::StrCat("training step ", t.state.step + 1, " failed: ", e.what())));
  }
  return absl::OkStatus();
}

absl::Status Trainer::Run() {
  while (!done()) {
    if (auto s = Step(); !s.ok()) return s;
  }
  return absl::OkStatus();
}

void Trainer::Cancel() { impl_->cancel.store(true); }
void Trainer::Interrupt() { impl_->interrupt.store(true); }
bool Trainer::cancelled() const { return impl_->cancel.load(); }

absl::StatusOr<std::string> Trainer::SaveCheckpoint() {
  if (!at_step_boundary()) {
    return absl::FailedPreconditionError(
        "a checkpoint can only be written between optimizer steps");
  }
  // Past the last evaluation the end has written the last step's checkpoint, and the weights
  // may be the best evaluation's by now (load_best_at_end): that checkpoint stays as it is.
  if (impl_->finishing && impl_->finishing->stage != Impl::Finishing::Stage::kLastEval) {
    return CheckpointPath(impl_->config.output_dir, impl_->state.step);
  }
  // Between steps the generators hold whichever job stepped last: the job's own stream is saved.
  ScopedRandomState installed(impl_->random, impl_->model->options().device.is_cuda());
  return impl_->Checkpoint();
}

bool Trainer::at_step_boundary() const { return impl_->micro_in_step == 0; }
bool Trainer::done() const { return impl_->done; }
int64_t Trainer::step() const { return impl_->state.step; }
int64_t Trainer::total_steps() const { return impl_->total_steps; }
int64_t Trainer::train_rows() const { return static_cast<int64_t>(impl_->data->train().size()); }
int64_t Trainer::validation_rows() const {
  return static_cast<int64_t>(impl_->data->validation().size());
}
bool Trainer::resumed() const { return impl_->resumed; }

}  // namespace lorad::engine
