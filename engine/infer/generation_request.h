// GenerationRequest and TokenEvent: what goes into the inference engine and what comes out of it,
// one event per generated token. torch-free, so the server (which never includes torch) builds
// requests from the proto and writes stream chunks from the events.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/infer/sampler.h"

namespace lorad::engine {

using RequestId = int64_t;

// Limits on a request's stop conditions (each is checked on every generated token).
inline constexpr size_t kMaxStopStrings = 64;
inline constexpr size_t kMaxStopStringBytes = 1024;
inline constexpr size_t kMaxStopTokenIds = 1024;

struct GenerationRequest {
  // The prompt: `prompt_ids` when not empty (used as given), else `prompt` text, encoded with the
  // model's special tokens (BOS) added. The server renders chat templates into `prompt`.
  std::string prompt;
  std::vector<int32_t> prompt_ids;
  // The request's field the prompt came from, as errors about its length name it ("messages" for
  // a rendered chat).
  std::string prompt_field = "prompt";
  std::string adapter;  // "" = the base model; else a name in the AdapterStore (latest version)
  // Who sent it (a token's name, a connection): waiting requests are admitted by their client's
  // share of the batch (batch_scheduler.h), so one client's burst does not hold back the others.
  std::string client;
  // > 0: only that version of `adapter` may serve the request (FAILED_PRECONDITION once a newer
  // one serves new requests, NOT_FOUND before it exists), checked as the engine pins it.
  int64_t adapter_version = 0;
  SamplingParams sampling;
  std::vector<std::string> stop;        // stop strings, matched on the decoded text
  std::vector<int32_t> stop_token_ids;  // end generation like EOS (the token counts as output)
  // How many entries at the end of `stop` and `stop_token_ids` the server added itself (a chat
  // template's end of turn): not counted against the limits, which are the caller's.
  size_t added_stops = 0;
  size_t added_stop_token_ids = 0;
  bool ignore_eos = false;  // keep going past the model's EOS tokens
  // After it the request finishes kCancelled with a DEADLINE_EXCEEDED status.
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
};

enum class FinishReason { kNone, kLength, kStop, kEos, kCancelled, kError };

// "length", "stop", "eos", "cancelled", "error"; "" for kNone.
const char* FinishReasonName(FinishReason reason);

struct GenerationUsage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double time_to_first_token_s = 0;  // submission -> first token sampled; 0 if none was
  double queue_time_s = 0;      // submission -> first admitted to the batch; -> the end if never
  int32_t preemptions = 0;      // times the sequence was evicted and recomputed
  int64_t adapter_version = 0;  // the adapter version that served it; 0 for the base model
};

// One callback invocation. Every generated token gives one event (text may be empty while a
// UTF-8 character or a possible stop string is incomplete); the last event has `finished` set
// and may carry no token (cancel, deadline, error).
struct TokenEvent {
  RequestId id = 0;
  std::optional<int32_t> token;            // the sampled token id
  std::string text;                        // UTF-8 text delta (never splits a character)
  std::optional<float> logprob;            // when sampling.logprobs > 0
  std::vector<TokenLogprob> top_logprobs;  // sampling.logprobs entries, most likely first
  bool finished = false;
  FinishReason finish_reason = FinishReason::kNone;
  absl::Status status;    // why, for kCancelled by deadline and kError
  GenerationUsage usage;  // filled on the last event
};

// What a request is checked against (InferenceEngine::Submit fills it from the engine).
struct RequestLimits {
  int32_t max_new_tokens = 0;  // InferenceEngineOptions::max_new_tokens_limit
  int64_t vocab_size = 0;
  int64_t max_context = 0;     // the model's context, prompt and new tokens together
  int64_t kv_pool_tokens = 0;  // tokens the whole KV pool holds
};

// InvalidArgument naming the first field of `request` out of range (sampling, the encoded
// `prompt`, stop strings and ids) and its limit.
absl::Status ValidateGenerationRequest(const GenerationRequest& request,
                                       const std::vector<int32_t>& prompt,
                                       const RequestLimits& limits);

// Called on the engine's loop thread: it must return quickly (queue the event and leave), must
// not call Step, and may call Submit or Cancel.
using TokenCallback = std::function<void(const TokenEvent&)>;

}  // namespace lorad::engine
