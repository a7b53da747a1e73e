// generation_bench: decode throughput of lorad's InferenceEngine (issue 5's benchmark).
//
// Loads the model folder as the daemon does on CUDA (bf16 compute, NF4 base), publishes
// --adapters random LoRA adapters to an AdapterStore on the device, and for every batch size runs
// that many requests of --prompt_tokens random prompt ids and exactly --new_tokens greedy tokens
// (ignore_eos: a random model would stop at random), twice: every request on the base model, and
// request i on adapter i % --adapters. All requests are submitted at once and the engine is
// stepped until it is idle, as the GPU loop does.
//
// Two rates per run, the same two the Python baseline measures:
//   end-to-end  batch * new_tokens / (submit -> last token)             (prefill included)
//   decode      batch * (new_tokens - 1) / (last first token -> last token)
// Every configuration runs once untimed before its timed run, so kernel loading, allocator growth
// and per-shape setup stay out of the figures (the Python baseline does the same).
//
// Prints a table and one "RESULT k=v ..." line per run for bench/engine_bench_report.py.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/bench_args.h"
#include "bench/gpu_stats.h"
#include "engine/infer/generation_request.h"
#include "engine/infer/inference_engine.h"
#include "engine/lora/adapter_store.h"
#include "engine/lora/lora_adapter.h"
#include "engine/model/llama_model.h"
#include "engine/model/tokenizer.h"

namespace lorad::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

struct RunResult {
  double e2e_tokens_per_s = 0;
  double decode_tokens_per_s = 0;
  double mean_ttft_s = 0;
  int64_t tokens = 0;
  int64_t peak_bytes = 0;
};

struct RunSpec {
  int64_t batch = 1;
  int64_t prompt_tokens = 128;
  int64_t new_tokens = 128;
  int64_t adapters = 0;  // 0: base model; else request i uses adapter i % adapters
  float repetition_penalty = 1.0f;
};

std::string AdapterName(int64_t i) { return absl::StrCat("bench-", i); }

// Submits spec.batch requests at once and steps the engine until idle.
absl::StatusOr<RunResult> RunOnce(engine::InferenceEngine& engine, const RunSpec& spec,
                                  int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  // Ids 0..2 are <unk>, <s>, </s>: keep the prompts free of special tokens.
  std::uniform_int_distribution<int32_t> token(3, static_cast<int32_t>(vocab - 1));
  std::vector<Clock::time_point> first(spec.batch), last(spec.batch);
  std::vector<int64_t> generated(spec.batch, 0);
  std::vector<std::string> errors;
  GpuStats::Synchronize();
  GpuStats::ResetPeak();
  const Clock::time_point start = Clock::now();
  for (int64_t i = 0; i < spec.batch; ++i) {
    engine::GenerationRequest request;
    request.prompt_ids.resize(spec.prompt_tokens);
    for (int32_t& id : request.prompt_ids) id = token(rng);
    if (spec.adapters > 0) request.adapter = AdapterName(i % spec.adapters);
    request.sampling.max_new_tokens = static_cast<int32_t>(spec.new_tokens);
    request.sampling.temperature = 0;
    request.sampling.repetition_penalty = spec.repetition_penalty;
    request.sampling.seed = seed;
    request.ignore_eos = true;
    auto id = engine.Submit(std::move(request), [&, i](const engine::TokenEvent& event) {
      if (event.token) {
        if (generated[i]++ == 0) first[i] = Clock::now();
        last[i] = Clock::now();
      }
      if (event.finished && event.finish_reason != engine::FinishReason::kLength) {
        errors.push_back(absl::StrCat("request ", i, " finished '",
                                      engine::FinishReasonName(event.finish_reason),
                                      "': ", event.status.ToString()));
      }
    });
    if (!id.ok()) return id.status();
  }
  while (engine.HasWork()) {
    if (auto s = engine.Step(); !s.ok()) return s;
  }
  GpuStats::Synchronize();
  if (!errors.empty()) return absl::InternalError(errors.front());
  RunResult r;
  Clock::time_point all_first = start, end = start;
  double ttft = 0;
  for (int64_t i = 0; i < spec.batch; ++i) {
    r.tokens += generated[i];
    all_first = std::max(all_first, first[i]);
    end = std::max(end, last[i]);
    ttft += Seconds(first[i] - start);
  }
  if (r.tokens != spec.batch * spec.new_tokens) {
    return absl::InternalError(absl::StrCat("generated ", r.tokens, " tokens, expected ",
                                            spec.batch * spec.new_tokens));
  }
  r.e2e_tokens_per_s = r.tokens / Seconds(end - start);
  r.decode_tokens_per_s = spec.batch * (spec.new_tokens - 1) / Seconds(end - all_first);
  r.mean_ttft_s = ttft / spec.batch;
  r.peak_bytes = GpuStats::PeakAllocatedBytes();
  return r;
}

// PEFT's init leaves B = 0, which would make every adapter a no-op; small random B makes the
// adapters real (the kernels' work does not depend on it, but the outputs then differ per adapter).
absl::Status PublishAdapters(engine::AdapterStore& store, const engine::ModelConfig& config,
                             int64_t count, int rank) {
  for (int64_t i = 0; i < count; ++i) {
    engine::LoraConfig lora;
    lora.r = rank;
    lora.alpha = rank;
    auto adapter = engine::LoraAdapter::Init(config, lora, 1000 + i);
    if (!adapter.ok()) return adapter.status();
    torch::manual_seed(2000 + i);
    for (auto& [name, pair] : adapter->layers) pair.b = torch::randn(pair.b.sizes()) * 0.01;
    auto version = store.Publish(AdapterName(i), *adapter, "bench");
    if (!version.ok()) return version.status();
  }
  return absl::OkStatus();
}

int Run(const BenchArgs& args) {
  const bool cuda = GpuStats::Available();
  engine::LlamaModelOptions model_options;
  model_options.base = engine::BaseWeights::kNf4;
  if (args.Get("base") == "float") model_options.base = engine::BaseWeights::kFloat;
  if (cuda) {
    model_options.device = torch::Device(torch::kCUDA, 0);
    model_options.dtype = torch::kBFloat16;
  }
  const std::string folder = args.Get("model");
  auto model = engine::LlamaModel::Load(folder, model_options);
  if (!model.ok()) {
    std::fprintf(stderr, "loading the model: %s\n", model.status().ToString().c_str());
    return 1;
  }
  auto tokenizer = engine::LoadTokenizer(folder);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "loading the tokenizer: %s\n", tokenizer.status().ToString().c_str());
    return 1;
  }
  const engine::ModelConfig& config = (*model)->config();

  const int64_t num_adapters = args.Int("adapters");
  engine::AdapterStoreOptions store_options;
  store_options.max_resident = static_cast<int32_t>(std::max<int64_t>(8, num_adapters));
  store_options.device = cuda ? "cuda" : "cpu";
  store_options.dtype = cuda ? "bfloat16" : "float32";
  auto store = engine::AdapterStore::Create(config, store_options);
  if (!store.ok()) {
    std::fprintf(stderr, "adapter store: %s\n", store.status().ToString().c_str());
    return 1;
  }
  if (auto s = PublishAdapters(**store, config, num_adapters, static_cast<int>(args.Int("rank")));
      !s.ok()) {
    std::fprintf(stderr, "publishing adapters: %s\n", s.ToString().c_str());
    return 1;
  }

  const std::vector<int64_t> batches = args.IntList("batches");
  const int64_t max_batch = *std::max_element(batches.begin(), batches.end());
  RunSpec spec;
  spec.prompt_tokens = args.Int("prompt_tokens");
  spec.new_tokens = args.Int("new_tokens");
  spec.repetition_penalty = static_cast<float>(args.Double("repetition_penalty"));
  engine::InferenceEngineOptions options;
  // Room for every sequence of the largest batch at full length, twice over.
  options.kv_cache_bytes = args.Int("kv_cache_mib") << 20;
  options.scheduler.max_running = static_cast<int32_t>(std::max<int64_t>(64, max_batch));
  // The whole batch's prompts prefill in one iteration, as generate() does, so the decode phase
  // starts with every sequence running.
  options.scheduler.token_budget = std::max<int64_t>(2048, max_batch * spec.prompt_tokens);
  options.scheduler.max_adapters_per_batch = static_cast<int32_t>(std::max<int64_t>(8, num_adapters));
  auto engine = engine::InferenceEngine::Create(model->get(), tokenizer->get(), store->get(),
                                                options);
  if (!engine.ok()) {
    std::fprintf(stderr, "inference engine: %s\n", engine.status().ToString().c_str());
    return 1;
  }

  const std::string device = GpuStats::DeviceName();
  std::printf("lorad InferenceEngine on %s: base %s, %lld prompt + %lld new tokens, greedy, "
              "repetition penalty %.2f, %lld adapters of rank %lld\n",
              device.c_str(), args.Get("base").c_str(),
              static_cast<long long>(spec.prompt_tokens),
              static_cast<long long>(spec.new_tokens), spec.repetition_penalty,
              static_cast<long long>(num_adapters), static_cast<long long>(args.Int("rank")));
  {
    RunSpec warm = spec;
    warm.batch = std::min<int64_t>(4, max_batch);
    warm.new_tokens = 8;
    warm.adapters = num_adapters;
    auto r = RunOnce(**engine, warm, config.vocab_size, 1);
    if (!r.ok()) {
      std::fprintf(stderr, "warm-up run failed: %s\n", r.status().ToString().c_str());
      return 1;
    }
  }
  std::printf("%6s %9s %14s %16s %10s %10s\n", "batch", "adapters", "e2e tok/s", "decode tok/s",
              "ttft ms", "peak GiB");
  int failures = 0;
  for (const int64_t batch : batches) {
    for (const int64_t adapters : {int64_t{0}, num_adapters}) {
      spec.batch = batch;
      spec.adapters = adapters;
      // An untimed pass at the same shapes first: on the H200 the first pass of a configuration
      // ran up to 3.5x slower than a repeat on both lorad and transformers (every decode step
      // meets a new KV length; per-shape setup on first use), which is not steady-state speed.
      auto r = RunOnce(**engine, spec, config.vocab_size, 7 + batch);
      if (r.ok()) r = RunOnce(**engine, spec, config.vocab_size, 7 + batch);
      if (!r.ok()) {
        std::fprintf(stderr, "batch %lld, %lld adapters failed: %s\n",
                     static_cast<long long>(batch), static_cast<long long>(adapters),
                     r.status().ToString().c_str());
        ++failures;
        continue;
      }
      std::printf("%6lld %9lld %14.1f %16.1f %10.1f %10.2f\n", static_cast<long long>(batch),
                  static_cast<long long>(adapters), r->e2e_tokens_per_s, r->decode_tokens_per_s,
                  r->mean_ttft_s * 1e3, r->peak_bytes / kGiB);
      std::printf(
          "RESULT bench=generate system=lorad base=%s batch=%lld adapters=%lld rep=%.2f "
          "e2e_tokens_per_s=%.1f decode_tokens_per_s=%.1f ttft_ms=%.1f peak_gib=%.3f\n",
          args.Get("base").c_str(), static_cast<long long>(batch),
          static_cast<long long>(adapters), spec.repetition_penalty, r->e2e_tokens_per_s,
          r->decode_tokens_per_s, r->mean_ttft_s * 1e3, r->peak_bytes / kGiB);
      std::fflush(stdout);
      if (num_adapters == 0) break;  // the adapter run would repeat the base run
    }
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace lorad::bench

int main(int argc, char** argv) {
  const lorad::bench::BenchArgs args(argc, argv,
                                     {{"model", ""},
                                      {"base", "nf4"},
                                      {"batches", "1,8,32"},
                                      {"prompt_tokens", "128"},
                                      {"new_tokens", "128"},
                                      {"adapters", "4"},
                                      {"rank", "16"},
                                      {"repetition_penalty", "1.0"},
                                      {"kv_cache_mib", "4096"}});
  try {
    return lorad::bench::Run(args);
  } catch (const std::exception& e) {
    // The engine promises no exceptions across its boundary; one here is a bug worth reporting.
    std::fprintf(stderr, "uncaught exception: %s\n", e.what());
    return 3;
  }
}
