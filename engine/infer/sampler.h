// Sampler: picks the next token of every row of a decode batch, each row with its own
// SamplingParams, on the device the logits are on (kernels/sampling.h does the work).
//
// Per row, in Hugging Face generate()'s order (processors, then warpers):
//   1. repetition_penalty over prompt + generated tokens (HF RepetitionPenaltyLogitsProcessor);
//   2. frequency_penalty and presence_penalty over generated tokens (OpenAI / vLLM semantics);
//   3. temperature == 0: greedy argmax (ties: lowest id); nothing below applies;
//   4. temperature, top_k, top_p, min_p (HF's warpers, in that order);
//   5. one draw from the softmax of what is left, with random bits from Philox keyed by
//      (seed, step): a seeded request gets the same tokens whatever shares its batch, in any row.
//
// Logprobs (params.logprobs = n > 0): the chosen token's log-probability and the n most likely
// tokens'. LogprobsMode::kRaw (the default, vLLM's default "raw_logprobs") takes log_softmax of
// the model's logits before any penalty or temperature; kProcessed ("processed_logprobs") takes
// it after penalties, temperature and top-k/top-p/min-p (removed tokens: -inf).
//
// This header is torch-free so the server can include it for SamplingParams; sampler.cpp uses
// libtorch.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace at {
class Tensor;
}  // namespace at

namespace lorad::engine {

inline constexpr int32_t kMaxLogprobs = 20;  // OpenAI's top_logprobs limit
// Temperatures below this sample as greedy (vLLM's rule): dividing by them overflows fp32.
inline constexpr float kGreedyTemperature = 1e-5f;

struct SamplingParams {
  int32_t max_new_tokens = 256;     // in [1, the configured limit]
  float temperature = 0.0f;         // 0 = greedy; finite, >= 0
  int32_t top_k = 0;                // 0 = off; >= 0
  float top_p = 1.0f;               // in (0, 1]; 1 = off
  float min_p = 0.0f;               // in [0, 1); 0 = off
  float repetition_penalty = 1.0f;  // finite, > 0; 1 = off
  float presence_penalty = 0.0f;    // finite; 0 = off
  float frequency_penalty = 0.0f;   // finite; 0 = off
  std::optional<uint64_t> seed;     // unset: ResolveSeed draws one at submission
  int32_t logprobs = 0;             // top-n log-probabilities per token, in [0, kMaxLogprobs]

  // InvalidArgument naming the first field out of range and its allowed range.
  absl::Status Validate(int32_t max_new_tokens_limit) const;
};

// params.seed, or a fresh one from std::random_device: call once per request, at submission,
// and keep it for every step of the request.
uint64_t ResolveSeed(const SamplingParams& params);

// One row of a decode batch.
struct SampleRow {
  SamplingParams params;                // Validate()d
  uint64_t seed = 0;                    // ResolveSeed(params), fixed for the request
  uint64_t step = 0;                    // tokens this request has generated so far
  absl::Span<const int32_t> prompt;     // token ids; repetition penalty only
  absl::Span<const int32_t> generated;  // token ids; all penalties
};

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
  std::string text;  // the token's own bytes as text (invalid UTF-8 as U+FFFD); set by the engine
  // The token's own bytes (a byte-fallback piece: its one byte); set by the engine.
  std::string bytes;
};

// SampledToken::token of a row whose logits hold NaN (a model that overflowed): it has no
// distribution to draw from, and its request should fail while the batch's others go on.
inline constexpr int32_t kNanLogitsToken = -1;

struct SampledToken {
  int32_t token = 0;                       // or kNanLogitsToken
  float logprob = 0.0f;                    // set when params.logprobs > 0
  std::vector<TokenLogprob> top_logprobs;  // params.logprobs entries, most likely first
};

enum class LogprobsMode { kRaw, kProcessed };

// Holds its mode and, on CUDA, the buffers its per-step upload goes through; one caller at a time
// (the GPU loop thread).
class Sampler {
 public:
  explicit Sampler(LogprobsMode mode = LogprobsMode::kRaw);
  ~Sampler();
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  // logits: [batch, vocab] fp32, bf16 or fp16, CPU or CUDA (left unchanged); rows: [batch].
  // Returns one token per row, in row order (kNanLogitsToken for a row holding NaN).
  // InvalidArgument for a shape, a parameter or a token id out of range; Internal if libtorch or
  // CUDA fails.
  absl::StatusOr<std::vector<SampledToken>> Sample(const at::Tensor& logits,
                                                   absl::Span<const SampleRow> rows) const;

  // The rows' parameters and histories on their way to the device (opaque: sampler.cpp).
  struct Upload;

 private:
  LogprobsMode mode_;
  std::unique_ptr<Upload> upload_;
};

}  // namespace lorad::engine
