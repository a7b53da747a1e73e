// InferenceEngine: continuous-batching generation on one shared base model, every request with its
// own LoRA adapter (or none), sampling parameters and stop rules, streamed token by token.
//
// Thread rules (DESIGN.md, "one GPU loop thread"):
//   Submit, Cancel, HasWork, Stats   any thread; they only touch a locked inbox and atomics.
//   Step                             the GPU loop thread only, called repeatedly while HasWork().
// Callbacks run on the loop thread inside Step (see TokenCallback).
//
// One Step = one iteration: take new and cancelled requests from the inbox; finish cancelled and
// past-deadline ones; PlanStep (batch_scheduler.h) decides which running sequences decode one
// token, which get their next prefill chunk, which waiting ones are admitted and which are
// preempted (KV blocks freed; recomputed from prompt + generated tokens when readmitted); one
// model forward runs every row of the plan through the paged KV cache with each row's adapter
// (MultiLoraApplier); the sampler picks the next token of every row whose prompt is complete;
// events go out and finished sequences free their blocks and adapter leases at once.
//
// torch-free header (pimpl): the server includes it. The model, tokenizer and adapter store are
// borrowed and must outlive the engine.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/infer/batch_scheduler.h"
#include "engine/infer/generation_request.h"
#include "engine/infer/sampler.h"

namespace lorad::engine {

class LlamaModel;
class Tokenizer;
class AdapterStore;

struct InferenceEngineOptions {
  // The paged KV pool: kv_cache_blocks blocks when > 0, else as many as kv_cache_bytes holds.
  int64_t kv_cache_bytes = int64_t{256} << 20;
  int32_t kv_cache_blocks = 0;
  int32_t block_size = 16;  // tokens per KV block
  SchedulerLimits scheduler;
  int32_t max_new_tokens_limit = 4096;  // SamplingParams::max_new_tokens upper bound
  int32_t max_queued = 4096;            // unfinished requests; Submit fails beyond
  LogprobsMode logprobs_mode = LogprobsMode::kRaw;
  // Steps where every row decodes one token run through LlamaModel::DecodeStep with the paged
  // decode attention kernel (engine/infer/decode_runner.h) when the model allows it; off: every
  // step runs through Forward (gather + scaled_dot_product_attention).
  bool paged_decode = true;
  // With paged_decode on CUDA: replay decode steps from captured CUDA graphs.
  bool cuda_graphs = true;
  // Benchmarks: wait for the device after each phase of a step and add its time to the stats
  // (slows every step a little; off in the daemon).
  bool profile_phases = false;
  // Told, from the engine's loop, of what an operator should know that no request reports:
  // CUDA graphs turned off after a failed capture (every decode step slower from then on). The
  // engine does not log (no spdlog under engine/); the daemon writes these to its log.
  std::function<void(const std::string&)> on_warning;
};

struct InferenceStats {
  int32_t running = 0;
  int32_t waiting = 0;
  double kv_cache_usage = 0;  // fraction of KV blocks in use
  int32_t kv_cache_blocks = 0;
  int64_t prompt_tokens = 0;     // prefilled since start (recomputes included)
  int64_t generated_tokens = 0;  // sampled since start
  int64_t preemptions = 0;
  int64_t steps = 0;
  // Decode steps replayed from CUDA graphs, graphs captured, and why graphs were turned off (empty
  // while they work or were never used).
  int64_t graph_replays = 0;
  int64_t graphs_captured = 0;
  std::string graph_error;
  // Stacks built for the step's adapter set (multi_lora_applier.h): one per new set; an idle
  // engine keeps the last one while its versions stay current.
  int64_t lora_stacks_built = 0;
  int32_t lora_stack_adapters = 0;  // adapters in the stack held now (kept while idle)
  // That stack's own device bytes: the kernels' tables (the adapters' weights are the store's,
  // shared, not copied).
  int64_t lora_stack_bytes = 0;
  // With InferenceEngineOptions::profile_phases: seconds spent, summed over steps, in planning
  // and admission, the forward (until its logits are ready), sampling, and emitting tokens.
  double plan_s = 0, forward_s = 0, sample_s = 0, emit_s = 0;
};

class InferenceEngine {
 public:
  // `adapters` may be null (then only base-model requests are accepted). InvalidArgument for
  // options out of range; ResourceExhausted when the KV pool cannot be allocated.
  static absl::StatusOr<std::unique_ptr<InferenceEngine>> Create(
      const LlamaModel* model, const Tokenizer* tokenizer, AdapterStore* adapters,
      const InferenceEngineOptions& options);
  ~InferenceEngine();
  InferenceEngine(const InferenceEngine&) = delete;
  InferenceEngine& operator=(const InferenceEngine&) = delete;

  // Validates and queues a request; `on_token` gets every event of it, the last with finished
  // set. Errors (nothing queued, no callback): InvalidArgument naming the field (empty prompt,
  // prompt longer than the context or the KV pool, token id outside the vocabulary, sampling
  // parameters, empty stop string), NotFound for an unknown adapter, ResourceExhausted when
  // max_queued requests are unfinished. The adapter version is fixed here: a version published
  // later serves only requests submitted later.
  absl::StatusOr<RequestId> Submit(GenerationRequest request, TokenCallback on_token);

  // Asks the loop to finish `id` with FinishReason::kCancelled at its next Step; unknown or
  // finished ids are ignored.
  void Cancel(RequestId id);

  // One iteration (see above). Returns an error when the iteration's forward or sampling failed;
  // the requests of that batch then finished with FinishReason::kError and the engine keeps
  // serving the others.
  absl::Status Step();

  // GPU loop thread, between steps: drops the adapter stack kept from earlier batches (and its
  // decode graphs) when one of its versions is no longer current or resident and no running
  // request uses it. The loop calls it when the adapter store reports a retired version
  // (AdapterStore::SetRetireListener), so an unloaded adapter leaves the device at once, also
  // while base-model requests keep the engine busy.
  void ReleaseIdleAdapters();

  // Once the loop has stopped calling Step (or on its thread, between steps): finishes every
  // queued and running request with FinishReason::kCancelled and status Unavailable(why), its
  // last event sent on the calling thread, and refuses every later Submit (Unavailable).
  // Idempotent. Engine::Stop calls it as its loop ends, so no request is left without its end.
  void Shutdown(const std::string& why);

  // True while any request is queued or running.
  bool HasWork() const;
  InferenceStats Stats() const;

  struct Impl;

 private:
  explicit InferenceEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lorad::engine
