// Batched sampling: penalties, temperature, top-k / top-p / min-p and the seeded draw of one token
// per row, each row with its own parameters. Three ops, applied in this order (the order of
// Hugging Face generate(): its logits processors, then its warpers):
//
//   sampling_penalties: repetition (HF RepetitionPenaltyLogitsProcessor), then frequency and
//                       presence (OpenAI / vLLM)
//   sampling_warp:      temperature, top-k, top-p, min-p (HF TemperatureLogitsWarper,
//                       TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, in that order)
//   sampling_draw:      greedy argmax, or one seeded draw from softmax of the warped logits
//
// Raw pointers and sizes. The CPU functions are the specification; the CUDA ones (sampling.cu)
// return the same bits: the same logits after each op and the same tokens for the same seeds and
// steps (kernels/sampling_math.h holds the arithmetic they share).
#pragma once

#include <cstdint>

namespace lorad::kernels {

// One row's parameters. The caller validates them (engine/infer/sampler.cpp); the kernels do
// not check ranges. Plain data: the CUDA launchers read an array of these from device memory.
struct SamplingRow {
  float temperature = 0.0f;         // 0 = greedy; else > 0 and finite
  int32_t top_k = 0;                // 0 (or >= vocab) = off
  float top_p = 1.0f;               // in (0, 1]; 1 = off
  float min_p = 0.0f;               // in [0, 1); 0 = off
  float repetition_penalty = 1.0f;  // > 0; 1 = off
  float presence_penalty = 0.0f;    // 0 = off
  float frequency_penalty = 0.0f;   // 0 = off
  uint64_t seed = 0;                // with `step`, the only input of the row's random draw
  uint64_t step = 0;                // tokens this sequence has generated so far
};

// The largest vocabulary the fixed-point masses of top-p and sampling_draw can sum: a row's total
// is below vocab * 2^40, which must fit in 64 bits.
inline constexpr int64_t kSamplingMaxVocab = int64_t{1} << 23;

// Token histories of a batch, concatenated (CSR). Row b's tokens are
// tokens[row_begin[b] .. row_begin[b + 1]); of those, [row_begin[b], generated_begin[b]) is the
// prompt and [generated_begin[b], row_begin[b + 1]) the generated tokens. Ids outside
// [0, vocab) are ignored.
struct TokenHistory {
  const int32_t* tokens = nullptr;           // [row_begin[batch]]
  const int64_t* row_begin = nullptr;        // [batch + 1]
  const int64_t* generated_begin = nullptr;  // [batch]
};

// Semantics, per row b (p = repetition_penalty, f = frequency_penalty, a = presence_penalty),
// for every distinct token id t in the row's history, once however often it occurs:
//   if p != 1:                 x[t] = x[t] < 0 ? x[t] * p : x[t] / p        (HF, prompt +
//   generated) c = occurrences of t among the generated tokens (the prompt does not count) if c >
//   0:                  x[t] = (x[t] - f * c) - a                    (OpenAI, vLLM's order)
// each operation one fp32 rounding. Tokens outside the history are unchanged.
// logits: [batch, vocab] fp32, row-major, changed in place.
void sampling_penalties_cpu(float* logits, int64_t batch, int64_t vocab, const SamplingRow* rows,
                            const TokenHistory& history);

// Semantics, per row b with temperature T > 0 (greedy rows are left as they are, as HF's greedy
// search applies no warper); "removed" means set to -inf:
//   1. temperature: z = x / T (one fp32 division).
//   2. top-k (0 < k < vocab): remove z < the k-th largest z (ties with it are kept, as in HF).
//   3. top-p (p < 1): with masses w = floor(exp(z - max z) * 2^40) (removed tokens: 0) and
//      S = sum w, sort the tokens ascending by z; remove every token whose cumulative mass,
//      counting all tokens with z less than or equal to its own, is <= floor((1 - p) * S).
//      This is HF's rule (remove when the ascending cumulative probability is <= 1 - p) in exact
//      integer arithmetic; tokens with equal z are kept or removed together, and the tokens with
//      the largest z are always kept.
//   4. min-p (m > 0): remove tokens with exp(z - max z) < m (HF: prob < m * max prob).
// exp is sampling_math::ExpNonPositive (within 2 ulp; the same bits on host and device).
// logits: [batch, vocab] fp32, changed in place.
void sampling_warp_cpu(float* logits, int64_t batch, int64_t vocab, const SamplingRow* rows);

// Semantics, per row b, on the warped logits:
//   T == 0: token = argmax x (ties: the lowest id, like torch.argmax).
//   T > 0:  w[j] = floor(exp(x[j] - max x) * 2^40), S = sum w,
//           u = floor(DrawBits(seed, step) * S / 2^64), uniform in [0, S),
//           token = the lowest j with w[0] + ... + w[j] > u  (inverse CDF in id order);
//           DrawBits = the first 64 bits of Philox4x32-10, key = seed, counter = (step, 0).
//           If S == 0 (no finite logit), the argmax as for T == 0.
// logits: [batch, vocab] fp32 (read only); tokens: [batch].
void sampling_draw_cpu(const float* logits, int64_t batch, int64_t vocab, const SamplingRow* rows,
                       int32_t* tokens);

// Declared in every build, defined in CUDA builds only: a CPU build's callers name them in
// the lambdas RunKernel (engine/model/kernel_launch.h) never calls there.
// CUDA launchers: device pointers (rows and every history array too), enqueued on `stream` (a
// cudaStream_t); each returns nullptr on success or the CUDA error string.
//
// scratch: [batch * vocab] int32, all zero on entry; the launcher leaves it all zero again, so
// one buffer serves every call. It counts each row's tokens without a per-row hash table.
const char* sampling_penalties_cuda(float* logits, int64_t batch, int64_t vocab,
                                    const SamplingRow* rows, const TokenHistory& history,
                                    int32_t* scratch, void* stream);
const char* sampling_warp_cuda(float* logits, int64_t batch, int64_t vocab, const SamplingRow* rows,
                               void* stream);
const char* sampling_draw_cuda(const float* logits, int64_t batch, int64_t vocab,
                               const SamplingRow* rows, int32_t* tokens, void* stream);

}  // namespace lorad::kernels
