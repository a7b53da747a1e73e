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
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/lora/lora_adapter.h"
#include "engine/lora/merged_model_writer.h"
#include "engine/lora/peft_config.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_weights.h"
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
#include "engine/train/trainer_impl.h"
#include "engine/train/training_checkpoint.h"
#include "engine/train/training_data.h"

namespace lorad::engine {
namespace {

using trainer_impl::Clock;
using trainer_impl::Seconds;

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

// `family` where the tokens transformers makes of its published template's text (as they are,
// apply_chat_template's way) are the ones the job trained on, else "": a named Alpaca template
// trains the BOS as the tokenizer adds it (ChatTemplate::ForEncoding), which on a sentencepiece
// tokenizer gives the first word another token than the BOS written as text does.
std::string MergedTemplateFamily(const Tokenizer& tokenizer, const std::string& model_folder,
                                 const std::string& family) {
  if (family.empty()) return "";
  auto chat = ChatTemplate::FromTokenizerConfig(model_folder, family);
  if (!chat.ok()) return "";
  auto text = chat->Render({{"user", "Hello there"}, {"assistant", "Hi"}}, false);
  if (!text.ok()) return "";
  return tokenizer.Encode(*text, /*add_special_tokens=*/false) == chat->Encode(tokenizer, *text)
             ? family
             : "";
}

// The files a job reads: its dataset, and its validation file when it has one.
std::vector<std::string> DatasetFiles(const TrainingJobConfig& config) {
  std::vector<std::string> files = {config.data.path};
  if (!config.data.validation_path.empty()) files.push_back(config.data.validation_path);
  return files;
}

// A resume's inputs against those its checkpoint (`resumed_from`) was trained on: the rest of
// the job would train on other examples, or on another base.
absl::Status CheckSameInputs(const TrainerState& trained_on, const Trainer::PreparedData& now,
                             const std::string& model_folder, const std::string& resumed_from) {
  if (!trained_on.dataset_fingerprint.empty() &&
      trained_on.dataset_fingerprint != now.dataset_fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the dataset (", absl::StrJoin(DatasetFiles(now.config), ", "),
        ") changed since the job started: ", resumed_from,
        " was trained on other contents, and resuming would train the rest of the job on other "
        "examples; put the original file back and retry the job (loradctl train retry) to "
        "resume it, or submit a new job"));
  }
  if (!trained_on.base_fingerprint.empty() && trained_on.base_fingerprint != now.base_fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the base model in ", model_folder,
        " is not the one the job started on (its config, tokenizer, weights or the operator's "
        "model.chat_template differ): ",
        resumed_from,
        " was trained on the other, and resuming would train the rest of the job on this one; "
        "start lorad on the original model folder, with the model.chat_template it had, and "
        "retry the job (loradctl train retry) to resume it, or submit the job again"));
  }
  return absl::OkStatus();
}

// What the job starts from, read off the GPU loop (a large model's checkpoint is hundreds of
// MB): with config.resume, the newest checkpoint that reads (one damaged, a file emptied or cut
// short by a disk that failed or an operator's mistake, is passed over for the one before it,
// saying so); else the adapter it continues (config.init_adapter_path), if any.
absl::Status ReadStart(Trainer::PreparedData& prepared) {
  const TrainingJobConfig& config = prepared.config;
  if (config.resume) RemoveLeftovers(config.output_dir);  // of a process killed mid-write
  auto found = config.resume ? CompleteCheckpoints(config.output_dir)
                             : std::vector<std::pair<int64_t, std::filesystem::path>>();
  std::sort(found.begin(), found.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  absl::Status newest_error;
  std::optional<TrainingCheckpoint>& checkpoint = prepared.checkpoint;
  for (const auto& [step, folder] : found) {
    auto c = ReadCheckpoint(folder.string());
    if (!c.ok()) {
      if (newest_error.ok()) newest_error = c.status();
      prepared.resume_warnings.push_back(
          absl::StrCat("checkpoint ", folder.string(), " cannot be resumed from (",
                       c.status().message(), "); it is passed over"));
      continue;
    }
    prepared.resumed_from = folder.string();
    checkpoint = *std::move(c);
    break;
  }
  // Folders a file is missing from (a disk that failed, an operator's mistake; a kill never
  // leaves one under the name) newer than the one resumed from: passed over too, saying so.
  if (config.resume) {
    for (const CheckpointFolder& f : CheckpointFolders(config.output_dir)) {
      if (!f.missing.empty() && (!checkpoint || f.step > checkpoint->state.step)) {
        prepared.resume_warnings.push_back(absl::StrCat("checkpoint ", f.path.string(), " lacks ",
                                                        f.missing, "; it is passed over"));
      }
    }
  }
  if (!newest_error.ok() && !checkpoint) {
    return absl::DataLossError(absl::StrCat(
        newest_error.message(), "; no checkpoint in ", config.output_dir,
        " can be resumed from: move the checkpoint-* folders aside and submit the job again to "
        "train it from its first step"));
  }
  if (checkpoint || config.init_adapter_path.empty()) return absl::OkStatus();
  if (!config.init_adapter_fingerprint.empty()) {
    if (auto s =
            CheckPeftFolderFingerprint(config.init_adapter_path, config.init_adapter_fingerprint,
                                       "when the job was submitted");
        !s.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("init_adapter: ", s.message(),
                       "; submit the job again to continue the adapter's current version"));
    }
  }
  auto a = LoraAdapter::ReadPeft(config.init_adapter_path);
  if (!a.ok()) return a.status();
  if (a->from_patterns) {
    return absl::InvalidArgumentError(absl::StrCat(
        "init_adapter_path: ", config.init_adapter_path,
        " has per-module ranks or alphas (rank_pattern / alpha_pattern): lorad serves such "
        "adapters but does not train them further"));
  }
  prepared.init_adapter = *std::move(a);
  return absl::OkStatus();
}

}  // namespace

absl::Status Trainer::Impl::Init(const Tokenizer& tokenizer, const std::string& model_folder,
                                 PreparedData prepared) {
  this->model_folder = model_folder;
  this->tokenizer = &tokenizer;
  end_of_turn = std::move(prepared.end_of_turn);
  merged_template = std::move(prepared.merged_template);
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

  std::optional<TrainingCheckpoint>& checkpoint = prepared.checkpoint;
  resume_warnings = std::move(prepared.resume_warnings);
  if (checkpoint) {
    adapter = checkpoint->adapter;
    state = checkpoint->state;
    seconds_before_this_run = state.train_seconds;
    std::vector<std::pair<double, double>> earlier;  // the ETA starts from their pace
    for (const StepMetrics& m : state.recent_steps)
      earlier.emplace_back(m.step_time_s, m.elapsed_s);
    pace.Resume(earlier);
    resumed = true;
    resumed_from = prepared.resumed_from;
  } else if (prepared.init_adapter) {
    adapter = *std::move(prepared.init_adapter);
    // Trained on from here on this base: its adapter_config.json (and ListAdapters) name it, as a
    // fresh job's do; PEFT loads the result onto the model named there.
    adapter.config.base_model_name_or_path = model_folder;
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
  // (PrepareData checked the checkpoint's inputs against the job's.)
  state.dataset_fingerprint = prepared.dataset_fingerprint;
  state.base_fingerprint = prepared.base_fingerprint;
  if (auto s = adapter.ValidateAgainst(model->config()); !s.ok()) {
    if (checkpoint || config.init_adapter_path.empty()) return s;
    return absl::Status(
        s.code(), absl::StrCat("init_adapter '", config.init_adapter_path, "': ", s.message()));
  }
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
      return absl::Status(s.code(), absl::StrCat("checkpoint ", resumed_from, ": ", s.message()));
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
  fo.checkpoint_keep_mlp = config.keep_mlp_layers;
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
  // ETA is from this run's recent pace (StepPace).
  m.elapsed_s = seconds_before_this_run + RunSeconds();
  pace.Add(m.step_time_s);
  m.eta_s = pace.SecondsPerStep(RunSeconds()) * static_cast<double>(total_steps - state.step);
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
  if (config.save_every > 0 && state.step % config.save_every == 0) return StartCheckpoint();
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

absl::Status Trainer::CheckMergedExport(const LlamaModel& model, const std::string& model_folder,
                                        const TrainingJobConfig& config) {
  if (config.export_merged_dtype.empty() || !model.bitsandbytes_checkpoint()) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      "export_merged: the base model in " + model_folder +
      " was quantized by bitsandbytes (a 4-bit checkpoint), and a merged export needs the 16-bit "
      "model it was made from; turn export_merged off (the adapter is saved either way), or serve "
      "the 16-bit model");
}

absl::StatusOr<std::shared_ptr<Trainer::PreparedData>> Trainer::PrepareData(
    const LlamaModel& model, const Tokenizer& tokenizer, const std::string& model_folder,
    const TrainingJobConfig& config, const std::atomic<bool>* abandon) {
  if (auto s = config.Validate(); !s.ok()) return s;
  // Before the data is read: the job would train to its end and fail at its export.
  if (auto s = CheckMergedExport(model, model_folder, config); !s.ok()) return s;
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
  auto base = ModelFolderFingerprint(model_folder, model.weights_fingerprint());
  if (!base.ok()) return base.status();
  // The operator's template only where the job takes the model's own (ExampleFormatter): a job
  // naming its template formats its examples the same whatever the operator picks.
  prepared->base_fingerprint = absl::StrCat(
      *base, "|",
      TakesModelsOwnTemplate(c.data.template_name) ? c.data.model_chat_template : std::string());
  if (auto s = ReadStart(*prepared); !s.ok()) return s;
  // A resume on another dataset or base fails before the whole dataset is read and tokenized
  // (minutes for a large one).
  if (const auto& checkpoint = prepared->checkpoint) {
    if (auto s =
            CheckSameInputs(checkpoint->state, *prepared, model_folder, prepared->resumed_from);
        !s.ok()) {
      return s;
    }
  }
  auto built = TrainingData::Build(c.data, *formatter, c.max_seq_length, c.seed, abandon);
  if (!built.ok()) return built.status();
  prepared->data = *std::move(built);
  // A merged export carries the template the job trained on where the folder's is another (or
  // none): transformers' apply_chat_template and vLLM then prompt it as lorad's Chat does, and
  // generation stops at its end of turn. After the read: under auto, the records decide.
  prepared->merged_template.family =
      MergedTemplateFamily(tokenizer, model_folder, formatter->TrainedTemplateNotTheFolders());
  if (!prepared->merged_template.family.empty() && prepared->merged_template.family != "alpaca") {
    if (auto id = tokenizer.IdOf(formatter->end_of_turn())) {
      prepared->merged_template.end_of_turn_id = *id;
    }
  }
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
                                int64_t max_records, const std::atomic<bool>* abandon) {
  if (auto s = CheckMergedExport(model, model_folder, config); !s.ok()) return s;
  TrainingJobConfig checked = config;
  auto formatter = FormatterFor(model, tokenizer, model_folder, checked);
  if (!formatter.ok()) return formatter.status();
  return TrainingData::Check(checked.data, *formatter, max_records, abandon);
}

absl::Status Trainer::Step() {
  Impl& t = *impl_;
  if (t.done) return absl::FailedPreconditionError("the training job has already ended");
  // The job's own random stream for this step, kept for its next one whatever happens here.
  ScopedRandomState installed(t.random, t.model->options().device.is_cuda());
  try {
    // A cancel during the merged export (minutes for a large model): the export gives up and
    // the job ends unfinished. A user's cancel ends it for good (the server publishes nothing
    // of a cancelled job, so the export would serve no one); a shutdown's (Interrupt, then
    // Cancel) leaves the last checkpoint, so the next start redoes the job's end.
    if (t.cancel.load() && t.finishing && t.finishing->files_written &&
        t.finishing->merged_export.valid() &&
        (t.finishing->abandon_export->load() ||
         t.finishing->merged_export.wait_for(std::chrono::seconds(0)) !=
             std::future_status::ready)) {  // one already written is kept: the job finishes
      t.finishing->abandon_export->store(true);
      // The export notices between tensors, or once its file is written: a user's cancel does
      // not hold the loop (its streams, other jobs) meanwhile, it looks again next turn; a
      // shutdown waits.
      if (!t.interrupt.load() && t.finishing->merged_export.wait_for(
                                     std::chrono::milliseconds(2)) != std::future_status::ready) {
        return absl::OkStatus();
      }
      (void)t.finishing->merged_export.get();
      return t.Finish(/*cancelled=*/true, false);
    }
    // Its adapter being written (on a thread of its own): waited for, so that a job whose
    // adapter is written finishes, as below (it did when the write ran within one Step()).
    if (t.cancel.load() && t.finishing && t.finishing->adapter_write.valid()) {
      if (auto s = t.CollectAdapterWrite(/*wait=*/true); !s.ok()) return t.Fail(s);
      if (t.finishing->merged_export.valid()) return absl::OkStatus();  // abandoned next turn
    }
    // Once its files are written, and its merged export with them, the job is done: a cancel
    // then would report a finished job as cancelled (the job finishes).
    if (t.cancel.load() && !(t.finishing && t.finishing->files_written)) {
      for (const torch::Tensor& p : t.params) p.mutable_grad() = torch::Tensor();
      // Trained to its last step, with that step's checkpoint not yet written (its evaluation
      // was under way, the end's or the cadence's): the checkpoint first, so that a cancel at
      // the end keeps what was trained (its adapter/ folder loads like any adapter).
      const bool last_step_unsaved =
          (t.finishing && (t.finishing->stage == Impl::Finishing::Stage::kLastEval ||
                           t.finishing->stage == Impl::Finishing::Stage::kLastCheckpoint)) ||
          (t.periodic_eval && t.state.step >= t.total_steps);
      if (last_step_unsaved) {
        // A shutdown's cancel leaves the job to resume from its last checkpoint on disk, even
        // when this one cannot be written; a user's fails it, saying why.
        if (auto path = t.Checkpoint(); !path.ok() && !t.interrupt.load()) {
          return t.Fail(path.status());
        }
      }
      return t.Finish(/*cancelled=*/true, false);
    }
    for (std::string& warning : t.resume_warnings) t.Warn(std::move(warning));
    t.resume_warnings.clear();
    if (!t.resumed_from.empty()) {
      // The checkpoint's recent steps and evaluations, then the checkpoint, reported again: a
      // process killed before its history was recorded lost them (the job's history keeps one
      // row per step and one event per evaluation and checkpoint).
      for (const StepMetrics& m : t.state.recent_steps) {
        TrainingEvent step;
        step.kind = TrainingEvent::Kind::kStep;
        step.step = m;
        step.replayed = true;
        t.Emit(step);
        for (const EvalMetrics& e : t.state.recent_evals) {
          if (e.step != m.step) continue;
          TrainingEvent eval;
          eval.kind = TrainingEvent::Kind::kEval;
          eval.eval = e;
          eval.replayed = true;
          t.Emit(eval);
        }
      }
      TrainingEvent resumed;
      resumed.kind = TrainingEvent::Kind::kCheckpoint;
      resumed.checkpoint = {t.state.step, t.resumed_from};
      resumed.replayed = true;
      t.resumed_from.clear();
      t.Emit(resumed);
    }
    // A periodic checkpoint written meanwhile is reported now; one that could not be starts a
    // wait for storage. Between optimizer steps only: a wait starts there (a job held mid-step
    // could not be checkpointed by a shutdown, and its step time would count the wait).
    if (t.micro_in_step == 0) {
      if (auto collected = t.CollectCheckpointWrite(/*wait=*/false); !collected.ok()) {
        return t.Fail(collected);
      }
    }
    // Waiting for storage: no work until the write that failed may be tried again.
    if (t.storage_wait && Clock::now() < t.storage_wait->retry_at) return absl::OkStatus();
    absl::Status s;
    if (t.pending_checkpoint) {
      s = t.CheckpointOrWait();  // the state it has held since the write failed
    } else if (t.finishing) {
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
    if (auto until = idle_until()) {  // a write to wait for: Step() would do nothing
      std::this_thread::sleep_until(*until);
      continue;
    }
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
  if (impl_->finishing && impl_->finishing->stage != Impl::Finishing::Stage::kLastEval &&
      impl_->finishing->stage != Impl::Finishing::Stage::kLastCheckpoint) {
    return CheckpointPath(impl_->config.output_dir, impl_->state.step);
  }
  // Between steps the generators hold whichever job stepped last: the job's own stream is saved.
  ScopedRandomState installed(impl_->random, impl_->model->options().device.is_cuda());
  // Called at the daemon's stop (Engine::StopTrainers): an exception here (a copy to the host
  // failing, a folder that cannot be listed) would end the process with the other jobs
  // unsaved; as in Step, libtorch's and the filesystem's exceptions become a status.
  absl::StatusOr<std::string> path;
  try {
    path = impl_->Checkpoint();
  } catch (const c10::Error& e) {
    path = absl::InternalError(e.what_without_backtrace());
  } catch (const std::exception& e) {
    path = absl::InternalError(e.what());
  }
  if (!path.ok()) {
    impl_->Warn(absl::StrCat("the checkpoint of step ", impl_->state.step,
                             " could not be written: ", path.status().message(),
                             "; the job resumes from its last checkpoint on disk"));
  }
  return path;
}

void Trainer::SetCheckpointWriteGateForTesting(std::function<void(int64_t)> gate) {
  impl_->checkpoint_write_gate = std::move(gate);
}

bool Trainer::at_step_boundary() const { return impl_->micro_in_step == 0; }
std::optional<std::chrono::steady_clock::time_point> Trainer::idle_until() const {
  return impl_->IdleUntil();
}
bool Trainer::done() const { return impl_->done; }
int64_t Trainer::step() const { return impl_->state.step; }
int64_t Trainer::total_steps() const { return impl_->total_steps; }
int64_t Trainer::train_rows() const { return static_cast<int64_t>(impl_->data->train().size()); }
int64_t Trainer::validation_rows() const {
  return static_cast<int64_t>(impl_->data->validation().size());
}
bool Trainer::resumed() const { return impl_->resumed; }

}  // namespace lorad::engine
