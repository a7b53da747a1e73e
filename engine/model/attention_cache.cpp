#include "engine/model/attention_cache.h"

#if defined(LORAD_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#endif

namespace lorad::engine {

PackedSequences PackedSequences::FromPositions(const torch::Tensor& positions, bool flash) {
  const int64_t rows = positions.size(0);
  const int64_t tokens = positions.size(1);
  // transformers' find_packed_sequence_indices: a sequence starts where positions do not go up
  // by one (padding continues its row's last sequence).
  const torch::Tensor step = torch::diff(positions, 1, -1, positions.narrow(1, 0, 1) - 1);
  PackedSequences packed;
  if (flash) {
    torch::Tensor starts = step != 1;  // [B, T]
    starts.select(1, 0).fill_(true);   // and every row starts one
    const torch::Tensor first = starts.reshape({-1}).nonzero().squeeze(1);
    packed.cu_seqlens =
        torch::cat({first, torch::full({1}, rows * tokens, first.options())}).to(torch::kInt);
    packed.max_seqlen = torch::diff(packed.cu_seqlens).max().item<int64_t>();
    return packed;
  }
  const torch::Tensor sequence = (step != 1).cumsum(-1);  // [B, T]
  const torch::Tensor t = torch::arange(tokens, positions.options());
  const torch::Tensor causal = t.view({1, tokens}) <= t.view({tokens, 1});  // [T(q), T(k)]
  packed.mask = (causal.unsqueeze(0) & (sequence.unsqueeze(2) == sequence.unsqueeze(1)))
                    .unsqueeze(1);  // [B, 1, T, T]
  return packed;
}

PackedSequences PackedSequences::For(const torch::Tensor& positions, const torch::Device& device,
                                     bool flash) {
  if (flash) {
    PackedSequences packed = FromPositions(positions.to(torch::kCPU, torch::kLong), true);
    if (packed.cu_seqlens.size(0) - 1 <= kMaxSegments) {
      packed.cu_seqlens = packed.cu_seqlens.to(device);
      return packed;
    }
  }
  return FromPositions(positions.to(device, torch::kLong), false);
}

bool PackedSequences::FlashRuns(const torch::Tensor& like, int64_t head_dim) {
#if defined(LORAD_WITH_CUDA)
  if (!like.is_cuda() ||
      (like.scalar_type() != torch::kBFloat16 && like.scalar_type() != torch::kHalf)) {
    return false;
  }
  if (head_dim % 8 != 0 || head_dim > 256) return false;
  return at::cuda::getDeviceProperties(like.device().index())->major >= 8;
#else
  (void)like;
  (void)head_dim;
  return false;
#endif
}

torch::Tensor PackedAttention(const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, const PackedSequences& packed) {
  if (!packed.cu_seqlens.defined()) return GroupedQueryAttention(q, k, v, packed.mask);
  const int64_t rows = q.size(0);
  const int64_t tokens = q.size(2);
  const int64_t d = q.size(3);
  // [B, n, T, D] -> [B * T, n, D]: a view when the projection's [B, T, n, D] layout is under it.
  const auto flat = [&](const torch::Tensor& t) {
    return t.transpose(1, 2).reshape({rows * tokens, t.size(1), d});
  };
  const torch::Tensor out = std::get<0>(at::_flash_attention_forward(
      flat(q), flat(k), flat(v), packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
      packed.max_seqlen, /*dropout_p=*/0.0, /*is_causal=*/true, /*return_debug_mask=*/false));
  return out.view({rows, tokens, q.size(1), d}).transpose(1, 2);
}

torch::Tensor GroupedQueryAttention(const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v, const torch::Tensor& mask) {
  const int64_t groups = q.size(1) / k.size(1);
  if (!mask.defined() && q.is_cuda()) {
    // The flash kernel reads each KV head for its group of query heads itself (enable_gqa):
    // no repeated copies of K and V, nor the sums of their gradients in training.
    return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/q.size(2) > 1,
                                            std::nullopt, /*enable_gqa=*/groups > 1);
  }
  torch::Tensor keys = k;
  torch::Tensor values = v;
  if (groups > 1) {
    // transformers' repeat_kv: KV head h serves query heads h * groups ... h * groups + groups - 1.
    keys = k.repeat_interleave(groups, 1);
    values = v.repeat_interleave(groups, 1);
  }
  if (!mask.defined()) {
    return at::scaled_dot_product_attention(q, keys, values, {}, 0.0, /*is_causal=*/q.size(2) > 1);
  }
  return at::scaled_dot_product_attention(q, keys, values, mask);
}

}  // namespace lorad::engine
