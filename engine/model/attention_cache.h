// AttentionCache: where a sequence's keys and values live between forward calls, and how
// attention reads them. The seam between the model and the cache layout: the model computes
// q, k, v (RoPE applied) and hands them over; ContiguousKvCache keeps [B, kv_heads, max, head_dim]
// per layer, a paged cache implements the same interface.
//
// One forward = BeginStep, Attend once per layer (in order), EndStep. Rows are right-padded: row b
// brings `tokens` new positions starting at lengths()[b], of which only the first valid[b] are
// kept by EndStep (the rest are overwritten later and never attended by valid tokens).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace lorad::engine {

class AttentionCache {
 public:
  virtual ~AttentionCache() = default;
  virtual int64_t batch_size() const = 0;
  // The most tokens a row can hold.
  virtual int64_t capacity() const = 0;
  // Tokens held per row [B]; the next forward's row b starts at position lengths()[b].
  virtual const std::vector<int64_t>& lengths() const = 0;

  // Starts a forward bringing `tokens` new positions per row. The caller checked capacity.
  virtual void BeginStep(int64_t tokens) = 0;
  // Stores layer `layer`'s k, v [B, kv_heads, tokens, head_dim] at each row's new positions and
  // returns the attention of q [B, heads, tokens, head_dim] over every key of its row at a
  // position <= its own: [B, heads, tokens, head_dim].
  virtual torch::Tensor Attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v) = 0;
  // Attend with RoPE applied on the way in: q, k and v [B, T, n, head_dim] as the projections
  // gave them (q and k not yet rotated, heads not transposed), cos and sin [B, T, head_dim]
  // (RotaryEmbedding::CosSin's). A cache that rotates while it stores, in fewer kernels, returns
  // what Attend would for the rotated q and k; the default returns an undefined tensor, and the
  // caller rotates and calls Attend.
  virtual torch::Tensor AttendRotating(int64_t /*layer*/, const torch::Tensor& /*q*/,
                                       const torch::Tensor& /*k*/, const torch::Tensor& /*v*/,
                                       const torch::Tensor& /*cos*/, const torch::Tensor& /*sin*/) {
    return torch::Tensor();
  }
  // Ends the forward: row b keeps valid[b] of the new positions.
  virtual void EndStep(const std::vector<int64_t>& valid) = 0;
};

// Rows that pack several sequences, attended without a cache: each token sees only the earlier
// tokens of its own sequence (a sequence starts where positions do not go up by one, and at each
// row's start). Either a mask for torch's SDPA (the CPU, and where flash attention cannot run), or
// on CUDA the sequences as flash attention's variable-length segments of the flattened rows: no
// [B, T, T] mask, and K and V not repeated for every query head.
struct PackedSequences {
  torch::Tensor mask;        // [B, 1, T, T] bool, true = attend; or undefined
  torch::Tensor cu_seqlens;  // [segments + 1] int32 on the device: segment starts in B * T tokens
  int64_t max_seqlen = 0;    // the longest segment, with cu_seqlens

  // The most segments one flash launch takes (its grid's y dimension).
  static constexpr int64_t kMaxSegments = 65535;
  // From positions [B, T] (long). `flash`: the segments (cu_seqlens on positions' device; from
  // CPU positions no device sync), else the mask (on positions' device).
  static PackedSequences FromPositions(const torch::Tensor& positions, bool flash);
  // For a forward on `device`: with `flash`, the segments, built from the positions on the host
  // (no device sync) unless there are more than kMaxSegments; else the mask, built on `device`.
  static PackedSequences For(const torch::Tensor& positions, const torch::Device& device,
                             bool flash);
  // Whether flash attention's variable-length kernel runs for q of this device, dtype and
  // head_dim (CUDA, sm_80 or later, fp16/bf16, head_dim a multiple of 8 up to 256).
  static bool FlashRuns(const torch::Tensor& like, int64_t head_dim);
};

// Attention of a packed forward: q [B, heads, T, D], k and v [B, kv_heads, T, D] -> [B, heads, T,
// D], through GroupedQueryAttention with `packed.mask` or flash attention over its segments
// (differentiable either way).
torch::Tensor PackedAttention(const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, const PackedSequences& packed);

// softmax(q k^T / sqrt(head_dim) + mask) v with grouped-query heads (each KV head serves
// heads / kv_heads query heads), through torch's scaled_dot_product_attention.
//   q [B, heads, T, D], k and v [B, kv_heads, S, D]
//   mask [B, 1, T, S] bool (true = attend) or undefined for plain causal attention (T == S)
// Returns [B, heads, T, D].
torch::Tensor GroupedQueryAttention(const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v, const torch::Tensor& mask);

}  // namespace lorad::engine
