// PlanStep: the continuous-batching scheduler as a pure function from the engine's state to one
// iteration's plan, so every admission and preemption rule is testable without a device.
//
// Each iteration (vLLM / TensorRT-LLM style):
//   1. every running sequence whose prompt is fully computed decodes one token; when the KV pool
//      cannot hold that token, the most recently arrived running sequence is preempted (its blocks
//      are freed and it goes back to the front of the waiting queue, to be recomputed later)
//      until it fits — a running sequence is never failed for lack of memory;
//   2. running sequences still in (chunked) prefill get their next chunk;
//   3. waiting requests are admitted while every admission rule holds: first those preempted
//      (in arrival order), then by their client's share, so that one client's burst does not
//      hold back the others: a client's k-th waiting request (arrival order) comes at its
//      running requests + k, and ties go by arrival (one client alone: arrival order). A request
//      whose adapter would exceed the per-batch adapter limit is skipped, the others may pass it;
//      lighter clients' requests may pass a client's first waiting request too. Each step it is
//      passed over so counts, and after `max_passed_over` it comes first (after preempted ones)
//      and nothing behind it is admitted until it fits (the batch's other adapters drain, memory
//      frees), so steady traffic on some adapters or from other clients never starves it. A
//      request first in line that does not fit the KV cache holds the line too.
// All prefill and decode tokens of an iteration share `token_budget`.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "engine/infer/kv_block_allocator.h"

namespace lorad::engine {

struct SchedulerLimits {
  int32_t max_running = 64;            // sequences decoding together
  int64_t token_budget = 2048;         // prefill + decode tokens per iteration
  int64_t prefill_chunk = 2048;        // longest prefill piece of one sequence per iteration
  int32_t max_adapters_per_batch = 8;  // distinct adapters in one batch ("" = base counts none)
  int32_t max_passed_over = 64;        // iterations a request may be passed over
};

// What the scheduler needs to know of a sequence.
struct ScheduledSequence {
  SequenceId id = 0;
  std::string adapter;          // "" for the base model
  int64_t prompt_tokens = 0;    // tokens to prefill (after a preemption: prompt + generated)
  int64_t computed_tokens = 0;  // tokens already in the KV cache
  int32_t passed_over = 0;      // iterations it was passed over (StepPlan::passed_over)
  std::string client;           // who sent it (GenerationRequest::client)
  bool preempted = false;       // waiting again after it ran
};

struct StepPlan {
  std::vector<SequenceId> decode;                       // one new token each
  std::vector<std::pair<SequenceId, int64_t>> prefill;  // (sequence, tokens this iteration)
  std::vector<SequenceId> admitted;                     // waiting -> running (also in prefill)
  std::vector<SequenceId> preempted;                    // running -> front of waiting
  std::vector<SequenceId> passed_over;  // waiting, skipped (adapter limit) or overtaken
  int64_t tokens = 0;                   // decode + prefill tokens planned
};

// `running` and `waiting` are each in arrival order. `kv` is read, not changed: the caller
// applies the plan (Release the preempted, Reserve for the rest).
StepPlan PlanStep(const std::vector<ScheduledSequence>& running,
                  const std::vector<ScheduledSequence>& waiting, const KvBlockAllocator& kv,
                  const SchedulerLimits& limits);

}  // namespace lorad::engine
