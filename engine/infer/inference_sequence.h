// The InferenceEngine's record of one request (Sequence) and of one row of a step's forward
// (Row); engine/infer/inference_engine.cpp's alone, apart so that the engine's file reads as the
// loop: submit, plan, run, sample, emit.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/infer/generation_request.h"
#include "engine/infer/stop_matcher.h"
#include "engine/lora/adapter_store.h"
#include "engine/model/incremental_detokenizer.h"

namespace lorad::engine::inference {

using Clock = std::chrono::steady_clock;

// A version of an adapter as the engine names it in its stack keys.
inline std::string AdapterKey(const std::string& name, int64_t version) {
  return absl::StrCat(name, "@", version);
}

// One request from Submit to its last event. Owned by the inbox, then by the loop thread.
struct Sequence {
  RequestId id = 0;
  GenerationRequest request;
  TokenCallback on_token;
  AdapterLease lease;                   // invalid for the base model
  const LoraAdapter* device = nullptr;  // the lease's resident copy while running
  std::vector<int32_t> prompt;
  std::vector<int32_t> generated;
  std::vector<int32_t> all;    // prompt + generated: the forward's input
  int64_t computed = 0;        // tokens of `all` in the KV cache
  int64_t prefill_target = 0;  // tokens to prefill (prompt, or all after a preemption)
  uint64_t seed = 0;
  std::unique_ptr<IncrementalDetokenizer> detokenizer;
  std::unique_ptr<StopMatcher> stops;
  Clock::time_point submitted;
  double ttft_s = 0;
  double queue_s = -1;  // submission -> first admission; -1 until admitted
  int32_t preemptions = 0;
  int32_t passed_over = 0;  // steps it waited, skipped for the batch's adapter limit

  // Orders sequences by adapter (the base model first) without building key strings.
  std::pair<std::string_view, int64_t> adapter_order() const {
    if (!lease.valid()) return {std::string_view(), 0};
    return {lease.name(), lease.version()};
  }
  std::string adapter_key() const {
    return lease.valid() ? AdapterKey(lease.name(), lease.version()) : "";
  }

  // Why the request ends with the token just accepted (an EOS, a stop token, a stop string,
  // its length or the context's), or kNone.
  FinishReason EndsWith(bool eos, bool stop_token, int64_t max_sequence) const {
    if (eos) return FinishReason::kEos;
    if (stop_token || stops->stopped()) return FinishReason::kStop;
    // Complete in held-back text, which ending here makes final.
    if (stops->watching() && detokenizer->pending_bytes() > 0 && !detokenizer->EndsMidCharacter() &&
        stops->WouldStop(detokenizer->TextIfEndedNow())) {
      return FinishReason::kStop;
    }
    if (static_cast<int64_t>(generated.size()) >= request.sampling.max_new_tokens ||
        static_cast<int64_t>(all.size()) >= max_sequence) {
      return FinishReason::kLength;
    }
    return FinishReason::kNone;
  }
};

// One row of the step's forward.
struct Row {
  Sequence* seq;
  int64_t tokens;  // new tokens this step
  bool samples;    // the row's prompt is complete after this step: sample its next token
};

}  // namespace lorad::engine::inference
