#include "engine/infer/generation_request.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lorad::engine {

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "";
}

absl::Status ValidateGenerationRequest(const GenerationRequest& r,
                                       const std::vector<int32_t>& prompt,
                                       const RequestLimits& limits) {
  if (auto s = r.sampling.Validate(limits.max_new_tokens); !s.ok()) return s;
  // Errors name the request's field (`prompt`, or `messages` for a chat): the API takes text,
  // and what is checked here is its encoding.
  if (prompt.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(r.prompt_field, ": encodes to no tokens; give text the model can read"));
  }
  const int64_t vocab = limits.vocab_size;
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat(r.prompt_field, ": token ", i, " of its encoding is id ", prompt[i],
                       ", outside the model's vocabulary [0, ", vocab,
                       ") (the tokenizer knows ids that config.json's vocab_size leaves out)"));
    }
  }
  const int64_t n = static_cast<int64_t>(prompt.size());
  if (n >= limits.max_context) {
    return absl::InvalidArgumentError(absl::StrCat(
        r.prompt_field, ": ", n, " tokens; the model's context is ", limits.max_context,
        " tokens, which must leave room for at least one new token"));
  }
  const int64_t pool = limits.kv_pool_tokens;
  if (n + 1 > pool) {
    return absl::InvalidArgumentError(absl::StrCat(r.prompt_field, ": ", n,
                                                   " tokens; the KV cache holds only ", pool,
                                                   " tokens in all (raise engine.kv_cache_bytes)"));
  }
  // Every stop string is matched against every token's text on the loop thread: bounded, so one
  // request cannot slow the whole batch (nor hold megabytes while it waits).
  const size_t stops = r.stop.size() - std::min(r.added_stops, r.stop.size());
  if (stops > kMaxStopStrings) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.stop: ", stops, " strings; at most ", kMaxStopStrings));
  }
  for (size_t i = 0; i < r.stop.size(); ++i) {
    if (r.stop[i].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("sampling.stop[", i, "] is an empty string"));
    }
    if (r.stop[i].size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat("sampling.stop[", i, "]: ", r.stop[i].size(),
                                                     " bytes; at most ", kMaxStopStringBytes));
    }
  }
  const size_t stop_ids =
      r.stop_token_ids.size() - std::min(r.added_stop_token_ids, r.stop_token_ids.size());
  if (stop_ids > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.stop_token_ids: ", stop_ids, " ids; at most ", kMaxStopTokenIds));
  }
  for (size_t i = 0; i < r.stop_token_ids.size(); ++i) {
    if (r.stop_token_ids[i] < 0 || r.stop_token_ids[i] >= vocab) {
      // Those after the request's own come from stop strings that are special tokens' text.
      return absl::InvalidArgumentError(
          i < stop_ids
              ? absl::StrCat("sampling.stop_token_ids[", i, "] = ", r.stop_token_ids[i],
                             " is outside the vocabulary")
              : absl::StrCat("sampling.stop: a stop string is the special token id ",
                             r.stop_token_ids[i], ", outside the model's vocabulary [0, ", vocab,
                             ") (the tokenizer knows ids that config.json's vocab_size leaves "
                             "out)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace lorad::engine
