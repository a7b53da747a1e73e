#include "engine/model/attention_cache.h"

namespace lorad::engine {

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
