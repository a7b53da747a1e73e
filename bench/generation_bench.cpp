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
// Also, in the same run: the NF4 base's device memory, the device-to-device copy bandwidth and
// from it the batch-1 bandwidth bound (weight bytes read per decode step / copy bandwidth), a
// check that CUDA-graph replay gives exactly the tokens of eager decode steps (--verify_graphs),
// the decode forward's own time per step for --forward_alone batches (ForwardAlone below), and
// the time to first token of one --ttft_prompt_tokens prompt, and with --arrival=RUNNING:PROMPT
// that of a prompt arriving while RUNNING requests decode (RunArrival).
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
#include "engine/infer/decode_runner.h"
#include "engine/infer/generation_request.h"
#include "engine/infer/inference_engine.h"
#include "engine/infer/paged_kv_cache.h"
#include "engine/infer/sampler.h"
#include "engine/lora/adapter_store.h"
#include "engine/lora/lora_adapter.h"
#include "engine/model/fused_layer_ops.h"
#include "engine/model/llama_model.h"
#include "engine/model/nf4_tensor.h"
#include "engine/model/tokenizer.h"

namespace lorad::bench {
namespace {

// The sampler on the GPU (its upload of parameters and histories, and the kernels) against the
// same sampler on the CPU (the kernels' references): 32 rows of random fp32 logits over the
// model's vocabulary, half greedy and half seeded top-p sampling, all with every penalty and a
// history; the tokens must be identical. Four rounds on one Sampler, as a decode loop calls it:
// the histories grow (so the upload's buffers grow), and one round has no penalty at all.
void VerifySampler(int64_t vocab) {
  constexpr int64_t kRows = 32;
  constexpr int kRounds = 4;
  torch::manual_seed(11);
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(vocab - 1));
  std::vector<std::vector<int32_t>> prompts(kRows), generated(kRows);
  const engine::Sampler sampler;
  int same = 0;
  for (int round = 0; round < kRounds; ++round) {
    const torch::Tensor logits = torch::randn({kRows, vocab}) * 4;
    const bool penalties = round != 2;
    std::vector<engine::SampleRow> rows(kRows);
    for (int64_t b = 0; b < kRows; ++b) {
      const int prompt = round == 0 ? 100 + static_cast<int>(b) : 0;
      for (int i = 0; i < prompt; ++i) prompts[b].push_back(token(rng));
      for (int i = 0; i < (round + 1) * 40 * (1 + static_cast<int>(b) % 4); ++i) {
        generated[b].push_back(token(rng) % 64);
      }
      engine::SamplingParams& p = rows[b].params;
      p.temperature = b % 2 == 0 ? 0.0f : 0.8f;
      p.top_p = 0.9f;
      p.repetition_penalty = penalties ? 1.3f : 1.0f;
      p.presence_penalty = penalties ? 0.5f : 0.0f;
      p.frequency_penalty = penalties ? 0.25f : 0.0f;
      rows[b].seed = 1000 + static_cast<uint64_t>(b);
      rows[b].step = generated[b].size();
      rows[b].prompt = prompts[b];
      rows[b].generated = generated[b];
    }
    auto on_gpu = sampler.Sample(logits.to(torch::kCUDA), rows);
    auto on_cpu = sampler.Sample(logits, rows);
    if (!on_gpu.ok() || !on_cpu.ok()) {
      std::printf("sampler check failed: %s\n",
                  (on_gpu.ok() ? on_cpu.status() : on_gpu.status()).ToString().c_str());
      return;
    }
    for (int64_t b = 0; b < kRows; ++b) same += (*on_gpu)[b].token == (*on_cpu)[b].token;
  }
  std::printf(
      "sampler on the GPU vs its CPU reference: %d of %lld rows in %d rounds (greedy and top-p, "
      "every penalty or none, growing histories) give identical tokens\n",
      same, static_cast<long long>(kRows * kRounds), kRounds);
  std::printf("RESULT bench=verify_sampler identical=%d of=%lld\n", same,
              static_cast<long long>(kRows * kRounds));
}

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

// A greedy request of `tokens` random prompt ids (ids 0..2 are <unk>, <s>, </s>: kept out) and
// exactly `new_tokens` new ones, request i on adapter i % spec.adapters (none without adapters).
engine::GenerationRequest BenchRequest(const RunSpec& spec, int64_t tokens, int64_t new_tokens,
                                       int64_t i, int64_t vocab, std::mt19937_64& rng) {
  std::uniform_int_distribution<int32_t> token(3, static_cast<int32_t>(vocab - 1));
  engine::GenerationRequest request;
  request.prompt_ids.resize(static_cast<size_t>(tokens));
  for (int32_t& id : request.prompt_ids) id = token(rng);
  if (spec.adapters > 0) request.adapter = AdapterName(i % spec.adapters);
  request.sampling.max_new_tokens = static_cast<int32_t>(new_tokens);
  request.sampling.temperature = 0;
  request.sampling.repetition_penalty = spec.repetition_penalty;
  request.ignore_eos = true;
  return request;
}

// Submits spec.batch requests at once and steps the engine until idle.
absl::StatusOr<RunResult> RunOnce(engine::InferenceEngine& engine, const RunSpec& spec,
                                  int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Clock::time_point> first(spec.batch), last(spec.batch);
  std::vector<int64_t> generated(spec.batch, 0);
  std::vector<std::string> errors;
  GpuStats::Synchronize();
  GpuStats::ResetPeak();
  const Clock::time_point start = Clock::now();
  for (int64_t i = 0; i < spec.batch; ++i) {
    engine::GenerationRequest request =
        BenchRequest(spec, spec.prompt_tokens, spec.new_tokens, i, vocab, rng);
    request.sampling.seed = seed;
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
    return absl::InternalError(
        absl::StrCat("generated ", r.tokens, " tokens, expected ", spec.batch * spec.new_tokens));
  }
  r.e2e_tokens_per_s = r.tokens / Seconds(end - start);
  r.decode_tokens_per_s = spec.batch * (spec.new_tokens - 1) / Seconds(end - all_first);
  r.mean_ttft_s = ttft / spec.batch;
  r.peak_bytes = GpuStats::PeakAllocatedBytes();
  return r;
}

// A prompt arriving while others decode (continuous batching's common case): `running` requests
// (--prompt_tokens prompts, request i on adapter i % adapters) decode until each has 8 tokens,
// then one `prompt_tokens`-token request arrives. Measured: its time to first token and the
// longest gap between two tokens of a decoding request from its arrival to that first token
// (what the arrival costs the others).
struct ArrivalResult {
  double ttft_s = 0;
  double longest_gap_s = 0;
};

absl::StatusOr<ArrivalResult> RunArrival(engine::InferenceEngine& engine, const RunSpec& spec,
                                         int64_t running, int64_t prompt_tokens, int64_t vocab) {
  std::mt19937_64 rng(7);
  const auto make = [&](int64_t tokens, int64_t new_tokens, int64_t i) {
    return BenchRequest(spec, tokens, new_tokens, i, vocab, rng);
  };
  std::vector<int64_t> generated(static_cast<size_t>(running), 0);
  std::vector<Clock::time_point> last(static_cast<size_t>(running));
  Clock::time_point arrived{}, first{};
  bool measuring = false, answered = false;
  double longest = 0;
  std::vector<engine::RequestId> ids;
  for (int64_t i = 0; i < running; ++i) {
    auto id = engine.Submit(make(spec.prompt_tokens, 1000, i), [&, i](const engine::TokenEvent& e) {
      if (!e.token) return;
      const Clock::time_point now = Clock::now();
      if (measuring && !answered)
        longest = std::max(longest, Seconds(now - std::max(last[i], arrived)));
      last[i] = now;
      ++generated[i];
    });
    if (!id.ok()) return id.status();
    ids.push_back(*id);
  }
  const auto least = [&] { return *std::min_element(generated.begin(), generated.end()); };
  while (least() < 8) {
    if (auto s = engine.Step(); !s.ok()) return s;
  }
  GpuStats::Synchronize();
  arrived = Clock::now();
  measuring = true;
  auto id = engine.Submit(make(prompt_tokens, 2, running), [&](const engine::TokenEvent& e) {
    if (e.token && !answered) first = Clock::now(), answered = true;
  });
  if (!id.ok()) return id.status();
  while (!answered) {
    if (auto s = engine.Step(); !s.ok()) return s;
  }
  for (const engine::RequestId running_id : ids) engine.Cancel(running_id);
  while (engine.HasWork()) {
    if (auto s = engine.Step(); !s.ok()) return s;
  }
  return ArrivalResult{Seconds(first - arrived), longest};
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

// Device-to-device copy bandwidth, read + write bytes per second (as bench/nf4_gemv_bench counts).
double CopyBandwidth() {
  if (!GpuStats::Available()) return 0;
  const int64_t bytes = int64_t{1} << 30;
  const auto options = torch::TensorOptions().dtype(torch::kUInt8).device(torch::kCUDA);
  torch::Tensor a = torch::ones({bytes}, options), b = torch::empty({bytes}, options);
  for (int i = 0; i < 3; ++i) b.copy_(a);
  GpuStats::Synchronize();
  const int reps = 20;
  const Clock::time_point start = Clock::now();
  for (int i = 0; i < reps; ++i) b.copy_(a);
  GpuStats::Synchronize();
  return 2.0 * bytes * reps / Seconds(Clock::now() - start);
}

// Greedy tokens of `batch` requests (request i on adapter i % adapters), stepped to the end.
absl::StatusOr<std::vector<std::vector<int32_t>>> Tokens(engine::InferenceEngine& engine,
                                                         int64_t batch, int64_t adapters,
                                                         int64_t vocab) {
  std::vector<std::vector<int32_t>> tokens(static_cast<size_t>(batch));
  std::mt19937_64 rng(99);
  std::uniform_int_distribution<int32_t> token(3, static_cast<int32_t>(vocab - 1));
  for (int64_t i = 0; i < batch; ++i) {
    engine::GenerationRequest request;
    request.prompt_ids.resize(static_cast<size_t>(16 + 8 * i));
    for (int32_t& id : request.prompt_ids) id = token(rng);
    if (adapters > 0 && i % (adapters + 1) != adapters)
      request.adapter = AdapterName(i % (adapters + 1));
    request.sampling.max_new_tokens = 48;
    request.sampling.repetition_penalty = 1.3f;
    request.ignore_eos = true;
    auto id = engine.Submit(std::move(request), [&tokens, i](const engine::TokenEvent& event) {
      if (event.token) tokens[i].push_back(*event.token);
    });
    if (!id.ok()) return id.status();
  }
  while (engine.HasWork()) {
    if (auto s = engine.Step(); !s.ok()) return s;
  }
  return tokens;
}

// How many requests of two runs of Tokens gave identical tokens.
int SameRequests(const std::vector<std::vector<int32_t>>& a,
                 const std::vector<std::vector<int32_t>>& b) {
  int same = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) same += a[i] == b[i];
  return same;
}

// The decode forward alone, for --forward_alone batches: one step of `batch` rows at position
// 192 (mid-way through 128 + 128 tokens; no adapters, no sampling) captured by a DecodeRunner, then
// replayed 64 times back to back (the host never waits: the GPU's own time per step) and 64 times
// waiting for each (as the engine waits for each step's tokens: adds the launch and wake-up
// latency between steps). Against the engine's decode tokens/s this says how much of a step is
// the forward's GPU time and how much the rest (sampling, the host, the gaps between steps).
void ForwardAlone(const engine::LlamaModel& model, const std::vector<int64_t>& batches) {
  if (!engine::DecodeRunner::Supports(model)) return;
  constexpr int64_t kPosition = 192;
  constexpr int64_t kBlockSize = 16;
  constexpr int kSteps = 64;
  const int64_t blocks_per_row = kPosition / kBlockSize + 1;
  for (const int64_t batch : batches) {
    engine::PagedKvCacheOptions o;
    o.num_layers = model.config().num_hidden_layers;
    o.num_blocks = batch * blocks_per_row;
    o.block_size = kBlockSize;
    o.kv_heads = model.config().num_key_value_heads;
    o.head_dim = model.config().head_dim;
    o.max_context = model.config().max_position_embeddings;
    o.dtype = model.options().dtype;
    o.device = model.options().device;
    engine::PagedKvCache cache(o);
    engine::DecodeRunner runner(&model, &cache, engine::DecodeRunnerOptions());
    std::vector<engine::DecodeRow> rows(static_cast<size_t>(batch));
    for (int64_t b = 0; b < batch; ++b) {
      rows[b].token = 3 + b;
      rows[b].position = kPosition;
      for (int64_t i = 0; i < blocks_per_row; ++i) {
        rows[b].block_table.push_back(static_cast<int32_t>(b * blocks_per_row + i));
      }
    }
    // Capture, then one replay, before timing.
    for (int i = 0; i < 2; ++i) {
      if (auto r = runner.Run(rows, nullptr); !r.ok()) {
        std::fprintf(stderr, "forward alone, batch %lld: %s\n", static_cast<long long>(batch),
                     r.status().ToString().c_str());
        return;
      }
    }
    GpuStats::Synchronize();
    const auto start = Clock::now();
    for (int i = 0; i < kSteps; ++i) (void)runner.Run(rows, nullptr);
    GpuStats::Synchronize();
    const auto back_to_back = Clock::now();
    for (int i = 0; i < kSteps; ++i) {
      (void)runner.Run(rows, nullptr);
      GpuStats::Synchronize();
    }
    const double free_ms = Seconds(back_to_back - start) / kSteps * 1e3;
    const double waited_ms = Seconds(Clock::now() - back_to_back) / kSteps * 1e3;
    std::printf(
        "decode forward alone, batch %lld (a captured step, no adapters, no sampling): %.3f ms "
        "a step back to back, %.3f ms waiting for each (%.1f / %.1f steps/s; %lld graph "
        "replays)\n",
        static_cast<long long>(batch), free_ms, waited_ms, 1e3 / free_ms, 1e3 / waited_ms,
        static_cast<long long>(runner.graph_replays()));
    std::printf("RESULT bench=forward_alone batch=%lld ms_back_to_back=%.3f ms_waited=%.3f\n",
                static_cast<long long>(batch), free_ms, waited_ms);
  }
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

  // Issue 3: the NF4 base's memory; issue 5: the batch-1 bound it implies.
  const int64_t base_bytes = (*model)->bytes();
  const int64_t embedding_bytes = config.vocab_size * config.hidden_size *
                                  static_cast<int64_t>(c10::elementSize(model_options.dtype));
  // A decode step reads every weight once, except the embedding (one row per token; with tied
  // embeddings the same matrix is read whole as lm_head).
  const int64_t step_bytes = base_bytes - (config.tie_word_embeddings ? 0 : embedding_bytes);
  const double copy_bandwidth = CopyBandwidth();
  std::printf("base weights (%s): %.2f GiB on the device; a decode step reads %.2f GiB of them\n",
              args.Get("base").c_str(), base_bytes / kGiB, step_bytes / kGiB);
  if (copy_bandwidth > 0) {
    std::printf(
        "device-to-device copy bandwidth (read + write): %.0f GB/s -> batch-1 bound "
        "%.2f ms per token = %.1f tokens/s\n",
        copy_bandwidth / 1e9, step_bytes / copy_bandwidth * 1e3, copy_bandwidth / step_bytes);
    std::printf(
        "RESULT bench=bound base_gib=%.3f step_gib=%.3f copy_gbps=%.0f "
        "bound_tokens_per_s=%.1f\n",
        base_bytes / kGiB, step_bytes / kGiB, copy_bandwidth / 1e9, copy_bandwidth / step_bytes);
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
  options.scheduler.max_adapters_per_batch =
      static_cast<int32_t>(std::max<int64_t>(8, num_adapters));
  options.cuda_graphs = args.Int("cuda_graphs") != 0;
  options.profile_phases = args.Int("profile_phases") != 0;
  if (args.Int("gemv_max_rows") >= 0) engine::Nf4Tensor::SetGemvMaxRows(args.Int("gemv_max_rows"));
  engine::SetFusedLayerOps(args.Int("fused_layer_ops") != 0 ? engine::FusedLayerOps::kCuda
                                                            : engine::FusedLayerOps::kOff);
  auto engine =
      engine::InferenceEngine::Create(model->get(), tokenizer->get(), store->get(), options);
  if (!engine.ok()) {
    std::fprintf(stderr, "inference engine: %s\n", engine.status().ToString().c_str());
    return 1;
  }

  const std::string device = GpuStats::DeviceName();
  std::printf(
      "lorad InferenceEngine on %s: base %s, %lld prompt + %lld new tokens, greedy, "
      "repetition penalty %.2f, %lld adapters of rank %lld\n",
      device.c_str(), args.Get("base").c_str(), static_cast<long long>(spec.prompt_tokens),
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
  if (args.Int("verify_graphs") != 0 && cuda && options.cuda_graphs) {
    // Graph replay must give exactly the tokens of the same decode steps launched eagerly.
    engine::InferenceEngineOptions eager_options = options;
    eager_options.cuda_graphs = false;
    auto eager = engine::InferenceEngine::Create(model->get(), tokenizer->get(), store->get(),
                                                 eager_options);
    if (!eager.ok()) {
      std::fprintf(stderr, "eager engine: %s\n", eager.status().ToString().c_str());
      return 1;
    }
    // 8 requests: a graph bucket, so both sides run the same shapes (cuBLAS picks its kernels by
    // shape, and a padded batch could round differently).
    auto graphed = Tokens(**engine, 8, num_adapters, config.vocab_size);
    auto plain = Tokens(**eager, 8, num_adapters, config.vocab_size);
    if (!graphed.ok() || !plain.ok()) {
      std::fprintf(stderr, "verify run failed: %s\n",
                   (graphed.ok() ? plain.status() : graphed.status()).ToString().c_str());
      return 1;
    }
    const int same = SameRequests(*graphed, *plain);
    std::printf(
        "CUDA graph replay vs eager decode steps: %d of %zu requests (on %lld adapters "
        "and the base, rep 1.3, 48 tokens) give identical tokens\n",
        same, graphed->size(), static_cast<long long>(num_adapters));
    std::printf("RESULT bench=verify_graphs identical=%d of=%zu\n", same, graphed->size());
    VerifySampler(config.vocab_size);
    // The fused layer kernels against the torch ops they replace (RMSNorm sums in another order,
    // so a near-tie of a random model's logits may break the other way).
    engine::SetFusedLayerOps(engine::FusedLayerOps::kOff);
    auto unfused = Tokens(**eager, 8, num_adapters, config.vocab_size);
    engine::SetFusedLayerOps(engine::FusedLayerOps::kCuda);
    if (unfused.ok()) {
      const int equal = SameRequests(*unfused, *plain);
      std::printf(
          "fused layer kernels vs torch ops (eager): %d of %zu requests give identical "
          "tokens\n",
          equal, unfused->size());
    }
  }
  if (cuda && !args.Get("forward_alone").empty()) {
    ForwardAlone(**model, args.IntList("forward_alone"));
  }
  if (const int64_t ttft_prompt = args.Int("ttft_prompt_tokens"); ttft_prompt > 0) {
    RunSpec ttft = spec;
    ttft.batch = 1;
    ttft.prompt_tokens = ttft_prompt;
    ttft.new_tokens = 2;
    ttft.adapters = num_adapters > 0 ? 1 : 0;
    auto r = RunOnce(**engine, ttft, config.vocab_size, 3);
    if (r.ok()) r = RunOnce(**engine, ttft, config.vocab_size, 4);
    if (r.ok()) {
      std::printf("time to first token, one %lld-token prompt%s: %.1f ms\n",
                  static_cast<long long>(ttft_prompt), ttft.adapters ? " on an adapter" : "",
                  r->mean_ttft_s * 1e3);
      std::printf("RESULT bench=ttft prompt_tokens=%lld ttft_ms=%.1f%s%s\n",
                  static_cast<long long>(ttft_prompt), r->mean_ttft_s * 1e3,
                  args.Get("variant").empty() ? "" : " variant=", args.Get("variant").c_str());
    } else {
      std::fprintf(stderr, "ttft run failed: %s\n", r.status().ToString().c_str());
    }
  }
  if (const std::string arrival = args.Get("arrival"); !arrival.empty()) {
    // --arrival=RUNNING:PROMPT, e.g. 31:2048 (on one adapter when there are adapters).
    const size_t colon = arrival.find(':');
    const int64_t running = std::stoll(arrival.substr(0, colon));
    const int64_t prompt =
        colon == std::string::npos ? 2048 : std::stoll(arrival.substr(colon + 1));
    RunSpec a = spec;
    a.adapters = num_adapters > 0 ? 1 : 0;
    auto r = RunArrival(**engine, a, running, prompt, config.vocab_size);
    if (r.ok()) r = RunArrival(**engine, a, running, prompt, config.vocab_size);
    if (r.ok()) {
      std::printf(
          "one %lld-token prompt arriving while %lld requests decode%s: its first token after "
          "%.1f ms; the decoding requests' longest gap between tokens meanwhile %.1f ms\n",
          static_cast<long long>(prompt), static_cast<long long>(running),
          a.adapters ? " (on an adapter)" : "", r->ttft_s * 1e3, r->longest_gap_s * 1e3);
      std::printf(
          "RESULT bench=arrival running=%lld prompt_tokens=%lld ttft_ms=%.1f%s%s "
          "longest_gap_ms=%.1f\n",
          static_cast<long long>(running), static_cast<long long>(prompt), r->ttft_s * 1e3,
          args.Get("variant").empty() ? "" : " variant=", args.Get("variant").c_str(),
          r->longest_gap_s * 1e3);
    } else {
      std::fprintf(stderr, "arrival run failed: %s\n", r.status().ToString().c_str());
    }
  }
  std::printf("%6s %9s %14s %16s %10s %10s\n", "batch", "adapters", "e2e tok/s", "decode tok/s",
              "ttft ms", "peak GiB");
  int failures = 0;
  engine::InferenceStats last = (*engine)->Stats();
  for (const int64_t batch : batches) {
    // The base, every request on one adapter, then num_adapters mixed (issue 5: mixed within 10%
    // of one adapter).
    // --adapter_cases: a subset of these (a profile of one case).
    std::vector<int64_t> adapter_counts = {0};
    if (num_adapters >= 1) adapter_counts.push_back(1);
    if (num_adapters > 1) adapter_counts.push_back(num_adapters);
    if (!args.Get("adapter_cases").empty()) adapter_counts = args.IntList("adapter_cases");
    for (const int64_t adapters : adapter_counts) {
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
          "RESULT bench=generate system=lorad base=%s graphs=%d%s%s batch=%lld adapters=%lld "
          "rep=%.2f e2e_tokens_per_s=%.1f decode_tokens_per_s=%.1f ttft_ms=%.1f peak_gib=%.3f\n",
          args.Get("base").c_str(), options.cuda_graphs ? 1 : 0,
          args.Get("variant").empty() ? "" : " variant=", args.Get("variant").c_str(),
          static_cast<long long>(batch), static_cast<long long>(adapters), spec.repetition_penalty,
          r->e2e_tokens_per_s, r->decode_tokens_per_s, r->mean_ttft_s * 1e3, r->peak_bytes / kGiB);
      const engine::InferenceStats stats = (*engine)->Stats();
      std::printf("       graphs: %lld captured, %lld replays%s%s\n",
                  static_cast<long long>(stats.graphs_captured),
                  static_cast<long long>(stats.graph_replays),
                  stats.graph_error.empty() ? "" : "; off: ", stats.graph_error.c_str());
      if (options.profile_phases) {
        // Since the previous configuration's stats (steps and times are cumulative).
        const double steps = static_cast<double>(stats.steps - last.steps);
        std::printf(
            "       per step (ms, device waited for after each phase): plan %.3f, "
            "forward %.3f, sample %.3f, emit %.3f over %.0f steps\n",
            (stats.plan_s - last.plan_s) / steps * 1e3,
            (stats.forward_s - last.forward_s) / steps * 1e3,
            (stats.sample_s - last.sample_s) / steps * 1e3,
            (stats.emit_s - last.emit_s) / steps * 1e3, steps);
      }
      last = stats;
      std::fflush(stdout);
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
                                      {"adapter_cases", ""},
                                      {"rank", "16"},
                                      {"repetition_penalty", "1.0"},
                                      {"cuda_graphs", "1"},
                                      {"profile_phases", "0"},
                                      {"gemv_max_rows", "-1"},
                                      {"variant", ""},
                                      {"fused_layer_ops", "1"},
                                      {"verify_graphs", "1"},
                                      {"forward_alone", "1,32"},
                                      {"ttft_prompt_tokens", "2048"},
                                      {"arrival", ""},
                                      {"kv_cache_mib", "4096"}});
  try {
    return lorad::bench::Run(args);
  } catch (const std::exception& e) {
    // The engine promises no exceptions across its boundary; one here is a bug worth reporting.
    std::fprintf(stderr, "uncaught exception: %s\n", e.what());
    return 3;
  }
}
