// InferenceEngine::Impl: the engine's state, shared by the files that define its parts:
// inference_engine.cpp (submission, the step's plan: admission, preemption, removal) and
// inference_batch.cpp (a step's batch: adapter stacks, logits, sampling, accepted tokens). Not
// part of the API.
#pragma once

#include <torch/cuda.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "engine/infer/decode_runner.h"
#include "engine/infer/inference_engine.h"
#include "engine/infer/inference_sequence.h"
#include "engine/infer/kv_block_allocator.h"
#include "engine/infer/paged_kv_cache.h"
#include "engine/lora/adapter_store.h"
#include "engine/lora/multi_lora_applier.h"
#include "engine/model/llama_model.h"
#include "engine/model/tokenizer.h"

namespace lorad::engine {

struct InferenceEngine::Impl {
  const LlamaModel* model;
  const Tokenizer* tokenizer;
  AdapterStore* adapters;
  InferenceEngineOptions options;
  int64_t max_context = 0;  // the model's: prompt and new tokens together
  // Tokens one sequence may hold: the model's context, or the whole KV pool when that is smaller.
  // A sequence ends with kLength there (as at the model's context): one that outgrew the pool
  // could never be admitted again, and the requests queued behind it would wait for ever.
  int64_t max_sequence = 0;
  Sampler sampler;

  // Inbox: any thread.
  mutable std::mutex mu;
  std::vector<std::unique_ptr<inference::Sequence>> submitted;
  std::set<RequestId> cancelled;
  RequestId next_id = 1;
  std::atomic<int64_t> unfinished{0};
  std::atomic<int32_t> running_count{0};
  std::atomic<int32_t> waiting_count{0};
  std::atomic<int64_t> prompt_tokens{0};
  std::atomic<int64_t> generated_tokens{0};
  std::atomic<int64_t> preemptions{0};
  std::atomic<int64_t> steps{0};
  std::atomic<int32_t> used_blocks{0};
  std::atomic<int64_t> graph_replays{0};
  std::atomic<int64_t> graphs_captured{0};
  std::atomic<int64_t> lora_stacks_built{0};
  std::atomic<int32_t> lora_stack_adapters{0};
  std::atomic<int64_t> lora_stack_bytes{0};
  std::string graph_error;  // under mu
  std::string shut_down;    // under mu: why Submit refuses (Shutdown), empty while serving
  // profile_phases: nanoseconds per phase, summed; `phase_start` is when the current phase began.
  std::atomic<int64_t> plan_ns{0}, forward_ns{0}, sample_ns{0}, emit_ns{0};
  inference::Clock::time_point phase_start;

  // Loop thread only.
  std::deque<std::unique_ptr<inference::Sequence>> waiting;   // arrival order
  std::vector<std::unique_ptr<inference::Sequence>> running;  // arrival (id) order
  std::unique_ptr<KvBlockAllocator> kv;
  std::unique_ptr<PagedKvCache> cache;
  std::unique_ptr<DecodeRunner> decoder;  // null: decode steps run through Forward
  std::vector<std::string> stack_key;     // the adapters `stack` was built for
  std::shared_ptr<const LoraStack> stack;

  Impl(const LlamaModel* m, const Tokenizer* t, AdapterStore* a, const InferenceEngineOptions& o)
      : model(m), tokenizer(t), adapters(a), options(o), sampler(o.logprobs_mode) {
    // A batch never names more adapters than can be resident at once: a request admitted beyond
    // that could not be made resident while the others run, and waited for ever.
    if (a != nullptr) {
      options.scheduler.max_adapters_per_batch =
          std::min(options.scheduler.max_adapters_per_batch, a->max_resident());
    }
  }

  void DrainInbox();
  void Emit(inference::Sequence& seq, TokenEvent event);
  void Finish(inference::Sequence& seq, FinishReason reason, absl::Status status, TokenEvent event);
  // Removes finished sequences (by id) from running and waiting, releasing their memory.
  void Remove(const std::set<RequestId>& ids);
  void FinishAndRemove(std::vector<inference::Sequence*> seqs, FinishReason reason,
                       const absl::Status& st);
  absl::Status RunBatch(const std::vector<inference::Row>& rows, std::set<RequestId>* finished);
  // The step's logits [rows, vocab] at each row's last new token.
  absl::StatusOr<torch::Tensor> Logits(const std::vector<inference::Row>& rows);
  // Logits for rows that each bring one token and sample (the decode runner) and for any rows
  // (the padded forward: every row as wide as the widest); slots[b] is row b's adapter slot.
  absl::StatusOr<torch::Tensor> DecodeLogits(const std::vector<inference::Row>& rows,
                                             const std::vector<int32_t>& slots,
                                             const std::shared_ptr<const LoraStack>& stack);
  absl::StatusOr<torch::Tensor> PaddedLogits(const std::vector<inference::Row>& rows,
                                             const std::vector<int32_t>& slots,
                                             const std::shared_ptr<const LoraStack>& stack);
  void Accept(inference::Sequence& seq, const SampledToken& sampled, std::set<RequestId>* finished);
  // Keeps the stack (and its decode graphs) while every adapter in it is the current, resident
  // version of its name or in use by a running request; drops both otherwise.
  void KeepStackWhileCurrent();
  // A sequence holding an adapter on the device left or was preempted since the last check.
  bool adapter_released = false;
  absl::StatusOr<std::shared_ptr<const LoraStack>> StackFor(const std::vector<inference::Row>& rows,
                                                            std::vector<int32_t>* slots);
  // Ends the current phase: adds its time to `total` (after waiting for the device's queued
  // work, so the time is the phase's own) and starts the next one.
  void EndPhase(std::atomic<int64_t>& total) {
    if (!options.profile_phases) return;
    if (model->options().device.is_cuda()) torch::cuda::synchronize();
    const inference::Clock::time_point now = inference::Clock::now();
    total += std::chrono::duration_cast<std::chrono::nanoseconds>(now - phase_start).count();
    phase_start = now;
  }
  void UpdateCounts() {
    if (decoder != nullptr) {
      graph_replays = decoder->graph_replays();
      graphs_captured = decoder->graphs_captured();
      if (!decoder->graph_error().empty() && graph_error.empty()) {  // written by this thread
        std::lock_guard<std::mutex> lock(mu);
        graph_error = decoder->graph_error();
        if (options.on_warning) options.on_warning(graph_error);
      }
    }
    running_count = static_cast<int32_t>(running.size());
    waiting_count = static_cast<int32_t>(waiting.size());
    used_blocks = kv->num_blocks() - kv->free_blocks();
  }
};

}  // namespace lorad::engine
