// The Engine (engine/runtime/engine.h) on a CUDA device with the tiny fixture model: the paths the
// CPU tests cover only on the CPU, where the GPU loop interleaves work the CPU tests run apart.
//   - training and serving in one loop (the train-credit loop), with chunked prefills that must
//     reserve their whole prompt's KV blocks in a pool too small for all of them at once;
//   - a trained adapter published to the store (read, not mapped) and served;
//   - StopTraining's checkpoint, and a new engine resuming from it to the same loss curve as a run
//     that never stopped (within bf16's run-to-run agreement);
//   - two jobs training at once, each on its own random stream (dropout, shuffling): same seed,
//     same losses, whatever the interleaving;
//   - packed examples kept apart (the masked attention path, not the flash kernel) train as the
//     same examples alone, and a packing job trains.
// Built by bench/engine_benches.cmake when GoogleTest is found, run by
// tests/gpu/run_engine_gpu_test.sh on the GPU machine (LORAD_TINY_MODEL: the model folder,
// LORAD_QA_DATA: tests/fixtures/qa_small.jsonl).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "engine/infer/sampler.h"
#include "engine/lora/lora_adapter.h"
#include "engine/model/checkpointed_call.h"
#include "engine/model/llama_model.h"
#include "engine/runtime/engine.h"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;
using std::chrono::seconds;

std::string EnvOrEmpty(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "";
}

// A fresh, empty folder for one test's job outputs.
std::string FreshFolder(const std::string& name) {
  fs::path folder = fs::temp_directory_path() / ("lorad-engine-gpu-" + name);
  fs::remove_all(folder);
  fs::create_directories(folder);
  return folder.string();
}

// LORAD_ENGINE_DEVICE=cpu runs the same test on the CPU (a check of the test itself).
std::string DeviceUnderTest() {
  const std::string device = EnvOrEmpty("LORAD_ENGINE_DEVICE");
  return device.empty() ? "cuda" : device;
}

EngineOptions TinyEngineOptions() {
  EngineOptions options;
  options.model_folder = EnvOrEmpty("LORAD_TINY_MODEL");
  options.device = DeviceUnderTest();
  options.base_weights = "nf4";
  // 24 blocks of 16 tokens: two of the long prompts below do not fit at once, and prefills come
  // in pieces of 32 tokens, so a prefill holds its whole prompt's blocks from its first piece.
  options.inference.kv_cache_blocks = 24;
  options.inference.block_size = 16;
  options.inference.scheduler.token_budget = 64;
  options.inference.scheduler.prefill_chunk = 32;
  return options;
}

TrainingJobConfig TinyJob(const std::string& output_dir, int64_t max_steps) {
  TrainingJobConfig config;
  config.data.path = EnvOrEmpty("LORAD_QA_DATA");
  config.lora.r = 8;
  config.lora.alpha = 16;
  config.lora.dropout = 0.1;  // draws from the job's random stream every micro-batch
  config.max_steps = max_steps;
  config.micro_batch_size = 2;
  config.grad_accum = 2;
  config.learning_rate = 2e-3;
  config.warmup_steps = 2;
  config.max_seq_length = 128;
  config.seed = 11;
  // Evaluations and the held-out answers run a piece per loop turn, beside the requests.
  config.data.validation_fraction = 0.25;
  config.eval_every = 5;
  config.output_dir = output_dir;
  return config;
}

// Collects a job's events from the loop thread; the test thread waits on them.
class JobEvents {
 public:
  TrainingEventCallback Callback() {
    return [this](const TrainingEvent& event) {
      std::lock_guard<std::mutex> lock(mu_);
      events_.push_back(event);
      cv_.notify_all();
    };
  }
  // True once a kStep event with step >= `step`, or the end, has come within `timeout`.
  bool WaitForStep(int64_t step, seconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] {
      for (const auto& e : events_) {
        if ((e.kind == TrainingEvent::Kind::kStep && !e.replayed && e.step.step >= step) ||
            Ended(e)) {
          return true;
        }
      }
      return false;
    });
  }
  bool WaitForEnd(seconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return !events_.empty() && Ended(events_.back()); });
  }
  std::vector<TrainingEvent> events() const {
    std::lock_guard<std::mutex> lock(mu_);
    return events_;
  }
  // Step -> loss, of the steps this run trained (not those a resume reports again).
  std::map<int64_t, double> Losses() const {
    std::map<int64_t, double> losses;
    for (const auto& e : events()) {
      if (e.kind == TrainingEvent::Kind::kStep && !e.replayed) losses[e.step.step] = e.step.loss;
    }
    return losses;
  }
  TrainingEvent Last() const { return events().back(); }

 private:
  static bool Ended(const TrainingEvent& e) {
    return e.kind == TrainingEvent::Kind::kFinished || e.kind == TrainingEvent::Kind::kFailed;
  }
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<TrainingEvent> events_;
};

// Collects the last event of each generation request.
class Finishes {
 public:
  TokenCallback Callback() {
    return [this](const TokenEvent& event) {
      if (!event.finished) return;
      std::lock_guard<std::mutex> lock(mu_);
      finished_.push_back(event);
      cv_.notify_all();
    };
  }
  bool WaitFor(size_t count, seconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return finished_.size() >= count; });
  }
  std::vector<TokenEvent> finished() const {
    std::lock_guard<std::mutex> lock(mu_);
    return finished_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<TokenEvent> finished_;
};

GenerationRequest LongPrompt(int64_t length, int32_t salt, const std::string& adapter = "") {
  GenerationRequest request;
  for (int64_t i = 0; i < length; ++i) {
    request.prompt_ids.push_back(static_cast<int32_t>(3 + (i * 37 + salt * 101) % 500));
  }
  request.adapter = adapter;
  request.sampling.max_new_tokens = 20;
  request.sampling.repetition_penalty = 1.3f;
  request.ignore_eos = true;
  return request;
}

std::unique_ptr<Engine> StartEngine(EngineOptions options) {
  auto engine = Engine::Start(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return nullptr;
  EXPECT_EQ((*engine)->device().device.rfind(DeviceUnderTest(), 0), 0u)
      << "the engine runs on " << (*engine)->device().device;
  return *std::move(engine);
}

double MaxRelativeDifference(const std::map<int64_t, double>& a,
                             const std::map<int64_t, double>& b) {
  double worst = 0;
  for (const auto& [step, loss] : a) {
    auto other = b.find(step);
    if (other == b.end()) return INFINITY;
    worst = std::max(worst, std::abs(loss - other->second) / std::max(1e-6, std::abs(loss)));
  }
  return worst;
}

TEST(EngineGpuTest, TrainsWhileServingChunkedPrefillsInAFullPoolThenServesTheAdapter) {
  ASSERT_FALSE(EnvOrEmpty("LORAD_TINY_MODEL").empty()) << "set LORAD_TINY_MODEL";
  auto engine = StartEngine(TinyEngineOptions());
  ASSERT_NE(engine, nullptr);
  JobEvents job;
  const std::string out = FreshFolder("train-serve");
  ASSERT_TRUE(engine->StartTraining("train-serve", TinyJob(out, 15), job.Callback()).ok());

  // 360 prompt tokens + 20 new = 24 blocks: the whole pool; the others need 11-15 blocks each.
  Finishes finishes;
  const std::vector<int64_t> lengths = {360, 170, 200, 230, 160, 210, 190, 220};
  for (size_t i = 0; i < lengths.size(); ++i) {
    auto id =
        engine->Generate(LongPrompt(lengths[i], static_cast<int32_t>(i)), finishes.Callback());
    ASSERT_TRUE(id.ok()) << id.status();
  }
  ASSERT_TRUE(finishes.WaitFor(lengths.size(), seconds(180)))
      << "requests stalled: " << finishes.finished().size() << " of " << lengths.size()
      << " finished";
  for (const auto& f : finishes.finished()) {
    EXPECT_EQ(f.finish_reason, FinishReason::kLength) << f.status;
    EXPECT_EQ(f.usage.completion_tokens, 20);
  }

  ASSERT_TRUE(job.WaitForEnd(seconds(180)));
  const TrainingEvent last = job.Last();
  ASSERT_EQ(last.kind, TrainingEvent::Kind::kFinished) << last.error;
  EXPECT_FALSE(last.summary.cancelled);
  EXPECT_EQ(last.summary.steps, 15);
  const auto losses = job.Losses();
  ASSERT_EQ(losses.size(), 15u);
  for (const auto& [step, loss] : losses) EXPECT_TRUE(std::isfinite(loss)) << "step " << step;
  EXPECT_LT(losses.rbegin()->second, losses.begin()->second) << "training did not lower the loss";
  const EngineStats stats = engine->Stats();
  EXPECT_GT(stats.train_seconds, 0);
  EXPECT_GT(stats.inference_seconds, 0);
  EXPECT_EQ(stats.inference.running + stats.inference.waiting, 0);

  // The job's adapter, published and served beside the base model.
  auto version = engine->adapters().LoadPeft("gpu-job", last.summary.adapter_path);
  ASSERT_TRUE(version.ok()) << version.status();
  Finishes served;
  ASSERT_TRUE(engine->Generate(LongPrompt(40, 1, "gpu-job"), served.Callback()).ok());
  ASSERT_TRUE(engine->Generate(LongPrompt(40, 1), served.Callback()).ok());
  ASSERT_TRUE(served.WaitFor(2, seconds(60)));
  for (const auto& f : served.finished()) EXPECT_EQ(f.finish_reason, FinishReason::kLength);
  engine->Stop();
}

TEST(EngineGpuTest, StopTrainingCheckpointsAndANewEngineResumesToTheSameLosses) {
  const int64_t kSteps = 12;
  std::map<int64_t, double> uninterrupted;
  {
    auto engine = StartEngine(TinyEngineOptions());
    ASSERT_NE(engine, nullptr);
    JobEvents job;
    ASSERT_TRUE(
        engine->StartTraining("whole", TinyJob(FreshFolder("whole"), kSteps), job.Callback()).ok());
    ASSERT_TRUE(job.WaitForEnd(seconds(180)));
    ASSERT_EQ(job.Last().kind, TrainingEvent::Kind::kFinished) << job.Last().error;
    uninterrupted = job.Losses();
    engine->Stop();
  }
  ASSERT_EQ(uninterrupted.size(), size_t(kSteps));

  const std::string out = FreshFolder("stopped");
  std::map<int64_t, double> resumed;
  {
    auto engine = StartEngine(TinyEngineOptions());
    ASSERT_NE(engine, nullptr);
    JobEvents job;
    ASSERT_TRUE(engine->StartTraining("stopped", TinyJob(out, kSteps), job.Callback()).ok());
    ASSERT_TRUE(job.WaitForStep(4, seconds(120)));
    EXPECT_EQ(engine->StopTraining(), 1);
    ASSERT_TRUE(job.WaitForEnd(seconds(60)));
    const TrainingEvent last = job.Last();
    ASSERT_EQ(last.kind, TrainingEvent::Kind::kFinished) << last.error;
    EXPECT_TRUE(last.summary.cancelled);
    bool checkpointed = false;
    for (const auto& e : job.events()) checkpointed |= e.kind == TrainingEvent::Kind::kCheckpoint;
    EXPECT_TRUE(checkpointed) << "StopTraining ended the job without a checkpoint";
    resumed = job.Losses();
    engine->Stop();
  }
  const int64_t stopped_at = resumed.rbegin()->first;
  ASSERT_LT(stopped_at, kSteps) << "the job ran to its end before StopTraining";
  {
    auto engine = StartEngine(TinyEngineOptions());
    ASSERT_NE(engine, nullptr);
    JobEvents job;
    ASSERT_TRUE(engine->StartTraining("stopped", TinyJob(out, kSteps), job.Callback()).ok());
    ASSERT_TRUE(job.WaitForEnd(seconds(180)));
    ASSERT_EQ(job.Last().kind, TrainingEvent::Kind::kFinished) << job.Last().error;
    const auto after = job.Losses();
    ASSERT_FALSE(after.empty());
    EXPECT_EQ(after.begin()->first, stopped_at + 1) << "the job did not resume where it stopped";
    for (const auto& [step, loss] : after) resumed[step] = loss;
    engine->Stop();
  }
  const double worst = MaxRelativeDifference(uninterrupted, resumed);
  std::printf("stopped at step %lld; resumed vs uninterrupted loss: max relative difference %.2e\n",
              static_cast<long long>(stopped_at), worst);
  EXPECT_LT(worst, 1e-2);
}

TEST(EngineGpuTest, TwoJobsTrainingAtOnceEachKeepTheirOwnRandomStream) {
  EngineOptions options = TinyEngineOptions();
  options.max_training_jobs = 2;
  std::map<int64_t, double> alone;
  {
    auto engine = StartEngine(options);
    ASSERT_NE(engine, nullptr);
    JobEvents job;
    ASSERT_TRUE(
        engine->StartTraining("alone", TinyJob(FreshFolder("alone"), 8), job.Callback()).ok());
    ASSERT_TRUE(job.WaitForEnd(seconds(120)));
    ASSERT_EQ(job.Last().kind, TrainingEvent::Kind::kFinished) << job.Last().error;
    alone = job.Losses();
    engine->Stop();
  }
  auto engine = StartEngine(options);
  ASSERT_NE(engine, nullptr);
  JobEvents first, second;
  ASSERT_TRUE(
      engine->StartTraining("first", TinyJob(FreshFolder("first"), 8), first.Callback()).ok());
  ASSERT_TRUE(
      engine->StartTraining("second", TinyJob(FreshFolder("second"), 8), second.Callback()).ok());
  ASSERT_TRUE(first.WaitForEnd(seconds(120)));
  ASSERT_TRUE(second.WaitForEnd(seconds(120)));
  ASSERT_EQ(first.Last().kind, TrainingEvent::Kind::kFinished) << first.Last().error;
  ASSERT_EQ(second.Last().kind, TrainingEvent::Kind::kFinished) << second.Last().error;
  const double between = MaxRelativeDifference(first.Losses(), second.Losses());
  const double vs_alone = MaxRelativeDifference(alone, first.Losses());
  std::printf("interleaved jobs: max relative loss difference %.2e between them, %.2e vs alone\n",
              between, vs_alone);
  EXPECT_LT(between, 1e-3);
  EXPECT_LT(vs_alone, 1e-3);
  engine->Stop();
}

// The loss and each LoRA gradient (A, then B, of every module) of one training forward of
// `batch` through `model` with a fresh adapter (B drawn from N(0, 0.05)), fp32 on the model's
// device as the trainer keeps it; checkpointed layers, their inputs offloaded to the host or not.
std::vector<torch::Tensor> LossAndGradients(const LlamaModel& model, const ForwardBatch& batch,
                                            const torch::Tensor& labels, bool offload = false,
                                            int64_t keep_last = 0, int64_t keep_mlp = 0) {
  LoraConfig config;
  config.r = 4;
  torch::manual_seed(3);
  auto adapter = LoraAdapter::Init(model.config(), config, 1);
  EXPECT_TRUE(adapter.ok()) << adapter.status();
  if (!adapter.ok()) return {};
  for (auto& [path, pair] : adapter->layers) {
    torch::NoGradGuard no_grad;
    pair.b.normal_(0, 0.05);
    pair.a = pair.a.to(model.options().device, torch::kFloat).requires_grad_(true);
    pair.b = pair.b.to(model.options().device, torch::kFloat).requires_grad_(true);
  }
  ForwardOptions options;
  options.adapter = &*adapter;
  options.train = true;
  options.checkpoint_layers = true;
  options.offload_checkpoints = offload;
  options.checkpoint_skip_last = keep_last;
  options.checkpoint_keep_mlp = keep_mlp;
  auto loss = model.Loss(batch, labels, options);
  EXPECT_TRUE(loss.ok()) << loss.status();
  if (!loss.ok()) return {};
  loss->backward();
  std::vector<torch::Tensor> out = {loss->detach().cpu()};
  for (auto& [path, pair] : adapter->layers) {
    out.push_back(pair.a.grad().cpu());
    out.push_back(pair.b.grad().cpu());
  }
  return out;
}

// The tiny fixture model with an NF4 base on the device under test (bf16 on CUDA).
absl::StatusOr<std::unique_ptr<LlamaModel>> TinyNf4Model() {
  LlamaModelOptions options;
  options.base = BaseWeights::kNf4;
  options.device = torch::Device(DeviceUnderTest());
  options.dtype = options.device.is_cuda() ? torch::kBFloat16 : torch::kFloat;
  return LlamaModel::Load(EnvOrEmpty("LORAD_TINY_MODEL"), options);
}

// Over LossAndGradients' LoRA gradients (index 1 on): the largest difference of got's from
// want's, relative to want's largest value.
double WorstGradientDiff(const std::vector<torch::Tensor>& got,
                         const std::vector<torch::Tensor>& want) {
  double worst = 0;
  for (size_t i = 1; i < want.size() && i < got.size(); ++i) {
    const double scale = std::max(want[i].abs().max().item<double>(), 1e-12);
    worst = std::max(worst, (got[i] - want[i]).abs().max().item<double>() / scale);
  }
  return worst;
}

// Checkpointed layers whose inputs wait in pinned host memory (copied out and back on a side
// stream while the layers compute) give the loss and LoRA gradients of inputs kept on the device,
// step after step (each step's first backward prefetches only its own step's inputs), with the last
// layer kept out of the checkpointing too (its backward runs while the last input comes back), and
// with checkpointed layers whose MLP keeps gate and up on the host (step 2: both layers; the
// recompute takes them instead of computing the products again).
TEST(ModelGpuTest, OffloadedCheckpointsGiveTheSameLossAndGradients) {
  ASSERT_FALSE(EnvOrEmpty("LORAD_TINY_MODEL").empty()) << "set LORAD_TINY_MODEL";
  auto model = TinyNf4Model();
  ASSERT_TRUE(model.ok()) << model.status();
  for (int step = 0; step < 3; ++step) {
    ForwardBatch batch;
    batch.input_ids = torch::randint(3, (*model)->config().vocab_size, {2, 200},
                                     torch::TensorOptions().dtype(torch::kLong));
    const int64_t keep_last = step == 1 ? 1 : 0;
    const int64_t keep_mlp = step == 2 ? 2 : 0;
    const auto want =
        LossAndGradients(**model, batch, batch.input_ids.clone(), /*offload=*/false, keep_last);
    const int64_t taken = ParkedValuesTaken();
    const auto got = LossAndGradients(**model, batch, batch.input_ids.clone(), /*offload=*/true,
                                      keep_last, keep_mlp);
    EXPECT_EQ(ParkedValuesTaken() - taken, 2 * keep_mlp) << "step " << step;  // gate, up a layer
    ASSERT_EQ(got.size(), want.size());
    ASSERT_FALSE(want.empty());
    EXPECT_NEAR(got[0].item<double>(), want[0].item<double>(), 1e-4 * want[0].item<double>())
        << "step " << step;
    const double worst = WorstGradientDiff(got, want);
    std::cout << "[offload] step " << step << ": loss " << got[0].item<double>() << " vs "
              << want[0].item<double>() << "; LoRA gradients max relative diff " << worst << "\n";
    // The same kernels on the same inputs: only the attention backward's order of atomic adds
    // may differ between two runs.
    EXPECT_LE(worst, 1e-2) << "step " << step;
  }
}

// The sampler on CUDA logits: a row holding NaN comes back as kNanLogitsToken (the GPU kernels
// drew the NaN's index, or token 0 from a row of NaN, as text), the other rows as on the CPU.
TEST(ModelGpuTest, SamplerReportsRowsOfNanLogitsOnTheGpuAsOnTheCpu) {
  torch::manual_seed(4);
  torch::Tensor logits = torch::randn({4, 1000});
  logits[0][7] = std::numeric_limits<float>::quiet_NaN();
  logits[2].fill_(std::numeric_limits<float>::quiet_NaN());
  std::vector<SampleRow> rows(4);
  for (int b = 0; b < 4; ++b) {
    rows[b].params.temperature = b % 2 == 0 ? 1.0f : 0.0f;
    rows[b].params.top_p = 0.9f;
    rows[b].params.logprobs = 2;  // gathered for every row: a NaN row's -1 was a device assert
    rows[b].seed = 40 + b;
  }
  const Sampler sampler;
  auto cpu = sampler.Sample(logits, rows);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto gpu = sampler.Sample(logits.to(torch::kCUDA), rows);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  for (int b = 0; b < 4; ++b) {
    EXPECT_EQ((*gpu)[b].token, (*cpu)[b].token) << "row " << b;
  }
  EXPECT_EQ((*gpu)[0].token, kNanLogitsToken);
  EXPECT_EQ((*gpu)[2].token, kNanLogitsToken);
  EXPECT_GE((*gpu)[1].token, 0);
  EXPECT_GE((*gpu)[3].token, 0);
  EXPECT_TRUE((*gpu)[0].top_logprobs.empty());
  EXPECT_EQ((*gpu)[1].top_logprobs.size(), 2u);
  // The device is still usable (a device-side assert would fail every later CUDA call).
  EXPECT_EQ(torch::ones({4}, torch::kCUDA).sum().item<float>(), 4.0f);
}

TEST(ModelGpuTest, PackedExamplesKeptApartTrainAsTheExamplesAlone) {
  ASSERT_FALSE(EnvOrEmpty("LORAD_TINY_MODEL").empty()) << "set LORAD_TINY_MODEL";
  auto model = TinyNf4Model();
  ASSERT_TRUE(model.ok()) << model.status();
  // Examples of 40, 25 and 60 tokens, alone (padded rows), and packed into two rows of 65: the
  // first two examples in row 0, the third in row 1 with 5 tokens of padding after it (whose
  // positions go on from the example's, as the trainer pads a packed row).
  const std::vector<int64_t> sizes = {40, 25, 60};
  const std::vector<int64_t> row_of = {0, 0, 1};
  const int64_t total = 125;
  const int64_t width = 65;
  const torch::Tensor tokens = torch::randint(3, (*model)->config().vocab_size, {total},
                                              torch::TensorOptions().dtype(torch::kLong));
  ForwardBatch alone;
  alone.input_ids = torch::zeros({3, 60}, torch::kLong);
  ForwardBatch packed;
  packed.input_ids = torch::zeros({2, width}, torch::kLong);
  packed.positions = torch::arange(width).repeat({2, 1});
  packed.lengths = {65, 60};
  torch::Tensor packed_labels;
  int64_t start = 0;
  std::vector<int64_t> row_start = {0, 0};
  for (int64_t i = 0; i < 3; ++i) {
    const torch::Tensor example = tokens.narrow(0, start, sizes[i]);
    alone.input_ids[i].narrow(0, 0, sizes[i]).copy_(example);
    alone.lengths.push_back(sizes[i]);
    const int64_t r = row_of[i];
    packed.input_ids[r].narrow(0, row_start[r], sizes[i]).copy_(example);
    packed.positions[r].narrow(0, row_start[r], sizes[i]).copy_(torch::arange(sizes[i]));
    row_start[r] += sizes[i];
    start += sizes[i];
  }
  packed_labels = packed.input_ids.clone();
  packed_labels[0][0] = kIgnoreLabel;
  packed_labels[0][40] = kIgnoreLabel;  // not predicted from the example before it
  packed_labels[1][0] = kIgnoreLabel;
  const auto want = LossAndGradients(**model, alone, alone.input_ids.clone());
  const auto got = LossAndGradients(**model, packed, packed_labels);
  ASSERT_EQ(got.size(), want.size());
  ASSERT_FALSE(want.empty());
  // Within bf16's rounding (the two run different attention kernels and layouts).
  EXPECT_NEAR(got[0].item<double>(), want[0].item<double>(), 1e-2 * want[0].item<double>());
  const double worst = WorstGradientDiff(got, want);
  std::cout << "[packed] loss " << got[0].item<double>() << " vs " << want[0].item<double>()
            << "; LoRA gradients max relative diff " << worst << "\n";
  EXPECT_LE(worst, 5e-2);

  // A packing job on the engine's loop trains.
  auto engine = StartEngine(TinyEngineOptions());
  ASSERT_NE(engine, nullptr);
  JobEvents job;
  TrainingJobConfig config = TinyJob(FreshFolder("packed"), 8);
  config.data.packing = true;
  ASSERT_TRUE(engine->StartTraining("packed", config, job.Callback()).ok());
  ASSERT_TRUE(job.WaitForEnd(seconds(180)));
  ASSERT_EQ(job.Last().kind, TrainingEvent::Kind::kFinished) << job.Last().error;
  const auto losses = job.Losses();
  ASSERT_EQ(losses.size(), 8u);
  for (const auto& [step, loss] : losses) EXPECT_TRUE(std::isfinite(loss)) << "step " << step;
  EXPECT_LT(losses.rbegin()->second, losses.begin()->second) << "training did not lower the loss";
  engine->Stop();
}

}  // namespace
}  // namespace lorad::engine
