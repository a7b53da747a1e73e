// trainer_bench: tokens/s and peak GPU memory of lorad's QLoRA Trainer (issue 4's benchmark).
//
// Loads the model folder as the daemon does on CUDA (engine/runtime/engine.cpp: bf16 compute,
// NF4 base by default), runs one training job through the same Trainer the GPU loop steps, and
// times each micro-batch with the device synchronized around it. The first --warmup steps
// (kernel loading, allocator growth, optimizer state creation) are not timed; the peak memory is
// reset after them, so it is the steady-state peak with the base weights counted, as
// torch.cuda.max_memory_allocated() after torch.cuda.reset_peak_memory_stats() on the Python side.
// The job's last step writes the final checkpoint and adapter to disk, so it is run but not timed
// with the steps: its Step() calls from the last step on are timed apart, as what the job's end
// holds the GPU loop (their sum and the longest; not the time it waits for its writes).
//
// Prints a human-readable summary and one "RESULT k=v ..." line that
// bench/engine_bench_report.py pairs with the transformers + PEFT baseline's.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_args.h"
#include "bench/gpu_stats.h"
#include "bench/kernel_profile.h"
#include "engine/model/fused_layer_ops.h"
#include "engine/model/llama_model.h"
#include "engine/model/tokenizer.h"
#include "engine/train/trainer.h"
#include "engine/train/training_job_config.h"

namespace lorad::bench {
namespace {

using engine::TrainingEvent;
using Clock = std::chrono::steady_clock;

int Run(const BenchArgs& args) {
  const bool cuda = GpuStats::Available();
  engine::LlamaModelOptions model_options;
  auto base = engine::BaseWeightsFromName(args.Get("base"));
  if (!base.ok()) {
    std::fprintf(stderr, "--base: %s\n", std::string(base.status().message()).c_str());
    return 2;
  }
  model_options.base = *base;
  // --layer_ops=torch: the reference torch ops instead of the fused kernels (a before/after).
  if (args.Get("layer_ops") == "torch") {
    engine::SetFusedLayerOps(engine::FusedLayerOps::kOff);
  } else if (args.Get("layer_ops") != "fused") {
    std::fprintf(stderr, "--layer_ops must be fused or torch, got '%s'\n",
                 args.Get("layer_ops").c_str());
    return 2;
  }
  if (cuda) {
    model_options.device = torch::Device(torch::kCUDA, 0);
    model_options.dtype = torch::kBFloat16;
  }
  // --memory_cap_gib=10: the caching allocator may hold (reserve) no more than this, as on a
  // card of that size: past it it frees its cache and waits for pending work before it fails.
  // The peak allocated figure alone misses what waits for a copy or is lost to fragmentation.
  const double cap_gib = args.Double("memory_cap_gib");
  if (cuda && cap_gib > 0) {
    torch::empty({1}, torch::Device(torch::kCUDA, 0));  // the allocator starts lazily
    const double total = static_cast<double>(at::cuda::getDeviceProperties(0)->totalGlobalMem);
    const double fraction = std::min(1.0, cap_gib * kGiB / total);
    c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, 0);
    std::printf("memory cap: the allocator reserves at most %.2f GiB\n", fraction * total / kGiB);
  }
  const std::string folder = args.Get("model");
  const Clock::time_point load_start = Clock::now();
  auto model = engine::LlamaModel::Load(folder, model_options);
  if (!model.ok()) {
    std::fprintf(stderr, "loading the model: %s\n", model.status().ToString().c_str());
    return 1;
  }
  GpuStats::Synchronize();
  const double load_s = std::chrono::duration<double>(Clock::now() - load_start).count();
  auto tokenizer = engine::LoadTokenizer(folder);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "loading the tokenizer: %s\n", tokenizer.status().ToString().c_str());
    return 1;
  }

  const int64_t warmup = args.Int("warmup");
  const int64_t measured = args.Int("steps");
  const int64_t profiled = cuda ? args.Int("profile_steps") : 0;
  engine::TrainingJobConfig config;
  config.data.path = args.Get("data");
  config.data.format = "text";
  config.data.response_only = false;  // plain text: every token is trained, as in the baseline
  config.lora.r = static_cast<int>(args.Int("rank"));
  config.lora.alpha = args.Double("alpha");
  // + the profiled steps, + the untimed last step that writes the adapter
  config.max_steps = warmup + measured + profiled + 1;
  config.micro_batch_size = args.Int("micro_batch");
  config.grad_accum = 1;
  config.learning_rate = args.Double("lr");
  config.optimizer = args.Get("optimizer");
  config.max_seq_length = args.Int("seq");
  config.gradient_checkpointing = args.Int("gradient_checkpointing") != 0;
  config.offload_activations = args.Int("offload_activations") != 0;
  config.keep_activations_layers = args.Int("keep_activations_layers");
  config.keep_mlp_layers = args.Int("keep_mlp_layers");
  // Short examples several to a row, kept apart (TRL's padding-free packing).
  config.data.packing = args.Int("packing") != 0;
  config.output_dir = args.Get("output_dir");
  // A checkpoint every N steps (0: none but the end's): what a checkpoint costs the loop.
  config.save_every = args.Int("save_every");
  config.resume = false;
  std::filesystem::remove_all(config.output_dir);
  if (auto s = config.Validate(); !s.ok()) {
    std::fprintf(stderr, "job config: %s\n", s.ToString().c_str());
    return 1;
  }

  std::vector<engine::StepMetrics> steps;
  std::string failure;
  auto trainer = engine::Trainer::Create(**model, **tokenizer, folder, config,
                                         [&](const TrainingEvent& event) {
                                           if (event.kind == TrainingEvent::Kind::kStep) {
                                             steps.push_back(event.step);
                                           } else if (event.kind == TrainingEvent::Kind::kFailed) {
                                             failure = event.error;
                                           }
                                         });
  if (!trainer.ok()) {
    std::fprintf(stderr, "creating the trainer: %s\n", trainer.status().ToString().c_str());
    return 1;
  }

  double timed_s = 0;
  int64_t timed_tokens = 0;
  std::vector<double> step_ms;
  for (int64_t i = 0; i < warmup + measured && !(*trainer)->done(); ++i) {
    if (i == warmup) GpuStats::ResetPeak();
    GpuStats::Synchronize();
    const Clock::time_point t0 = Clock::now();
    if (auto s = (*trainer)->Step(); !s.ok()) {
      std::fprintf(stderr, "step %lld failed: %s\n", static_cast<long long>(i + 1),
                   s.ToString().c_str());
      if (!failure.empty()) std::fprintf(stderr, "kFailed event: %s\n", failure.c_str());
      return 1;
    }
    GpuStats::Synchronize();
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    const double loss = steps.empty() ? 0 : steps.back().loss;
    std::printf("step %3lld  %8.1f ms  loss %.6f  tokens %lld%s\n", static_cast<long long>(i + 1),
                dt * 1e3, loss, static_cast<long long>(steps.empty() ? 0 : steps.back().tokens),
                i < warmup ? "  (warm-up)" : "");
    if (i >= warmup) {
      timed_s += dt;
      timed_tokens += steps.back().tokens;
      step_ms.push_back(dt * 1e3);
    }
  }
  const int64_t peak = GpuStats::PeakAllocatedBytes();
  const int64_t peak_reserved = GpuStats::PeakReservedBytes();
  if (profiled > 0 && !(*trainer)->done()) {  // after the timed steps, so they are not slowed
    KernelProfile::Start();
    const Clock::time_point t0 = Clock::now();
    int64_t n = 0;
    for (; n < profiled && !(*trainer)->done(); ++n) {
      if (auto s = (*trainer)->Step(); !s.ok()) {
        std::fprintf(stderr, "profiled step failed: %s\n", s.ToString().c_str());
        return 1;
      }
    }
    GpuStats::Synchronize();
    KernelProfile::StopAndPrint(
        n, std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  // The last step and the end (its checkpoint and adapter): what the calls hold the loop.
  double end_held_ms = 0, end_longest_ms = 0;
  int64_t end_calls = 0;
  const Clock::time_point end_start = Clock::now();
  while (!(*trainer)->done()) {
    if (auto until = (*trainer)->idle_until()) {  // waits for a write: the loop would serve
      std::this_thread::sleep_until(*until);
      continue;
    }
    GpuStats::Synchronize();
    const Clock::time_point t0 = Clock::now();
    if (auto s = (*trainer)->Step(); !s.ok()) {
      std::fprintf(stderr, "final step failed: %s\n", s.ToString().c_str());
      return 1;
    }
    GpuStats::Synchronize();
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    end_held_ms += ms;
    end_longest_ms = std::max(end_longest_ms, ms);
    ++end_calls;
  }
  const double end_ms = std::chrono::duration<double, std::milli>(Clock::now() - end_start).count();
  std::printf(
      "the last step and the end: %.1f ms, of which Step() calls held the loop %.1f ms (%lld "
      "calls, the longest %.1f ms)\n",
      end_ms, end_held_ms, static_cast<long long>(end_calls), end_longest_ms);
  if (timed_s <= 0) {
    std::fprintf(stderr, "no step was timed (dataset too small for warm-up + steps?)\n");
    return 1;
  }
  std::sort(step_ms.begin(), step_ms.end());
  const double tokens_per_s = timed_tokens / timed_s;
  std::printf(
      "lorad trainer on %s: base %s, %s, r=%d, micro-batch %lld x seq %lld, grad_accum 1\n"
      "  model load + quantize %.1f s; %lld timed steps, median %.1f ms\n"
      "  %.0f tokens/s, peak allocated %.2f GiB (reserved %.2f GiB)\n",
      GpuStats::DeviceName().c_str(), args.Get("base").c_str(), config.optimizer.c_str(),
      config.lora.r, static_cast<long long>(config.micro_batch_size),
      static_cast<long long>(config.max_seq_length), load_s, static_cast<long long>(step_ms.size()),
      step_ms[step_ms.size() / 2], tokens_per_s, peak / kGiB, peak_reserved / kGiB);
  std::printf(
      "RESULT bench=train system=lorad base=%s optimizer=%s checkpointing=%d offload=%d "
      "kept_layers=%lld kept_mlp=%lld cap_gib=%g layer_ops=%s packing=%d batch=%lld seq=%lld "
      "tokens_per_s=%.1f peak_gib=%.3f step_ms=%.2f end_held_ms=%.1f end_longest_ms=%.1f\n",
      args.Get("base").c_str(), config.optimizer.c_str(), config.gradient_checkpointing ? 1 : 0,
      config.offload_activations ? 1 : 0, static_cast<long long>(config.keep_activations_layers),
      static_cast<long long>(config.keep_mlp_layers), cap_gib, args.Get("layer_ops").c_str(),
      config.data.packing ? 1 : 0, static_cast<long long>(config.micro_batch_size),
      static_cast<long long>(config.max_seq_length), tokens_per_s, peak / kGiB,
      step_ms[step_ms.size() / 2], end_held_ms, end_longest_ms);
  return 0;
}

}  // namespace
}  // namespace lorad::bench

int main(int argc, char** argv) {
  const lorad::bench::BenchArgs args(argc, argv,
                                     {{"model", ""},
                                      {"data", ""},
                                      {"base", "nf4"},
                                      {"optimizer", "adamw_8bit"},
                                      {"rank", "16"},
                                      {"alpha", "16"},
                                      {"lr", "2e-4"},
                                      {"micro_batch", "2"},
                                      {"seq", "512"},
                                      {"warmup", "3"},
                                      {"steps", "10"},
                                      {"gradient_checkpointing", "0"},
                                      {"offload_activations", "0"},
                                      {"keep_activations_layers", "0"},
                                      {"keep_mlp_layers", "0"},
                                      {"memory_cap_gib", "0"},
                                      {"packing", "0"},
                                      {"profile_steps", "0"},
                                      {"layer_ops", "fused"},
                                      {"save_every", "0"},
                                      {"output_dir", "/tmp/lorad-trainer-bench"}});
  try {
    return lorad::bench::Run(args);
  } catch (const std::exception& e) {
    // The engine promises no exceptions across its boundary; one here is a bug worth reporting.
    std::fprintf(stderr, "uncaught exception: %s\n", e.what());
    return 3;
  }
}
