// RotaryEmbedding: rotary position embedding (RoPE) as transformers' Llama family computes it.
//
// inv_freq[i] = 1 / theta^(2i / head_dim), i < head_dim / 2, in fp32; the "llama3" type (Llama
// 3.1+) rescales it exactly as transformers' _compute_llama3_parameters: wavelengths shorter than
// original_max / high_freq_factor kept, longer than original_max / low_freq_factor divided by
// `factor`, smoothly interpolated between. Angles are position x inv_freq in fp32, whatever the
// compute dtype; cos/sin are then cast to it (as transformers does).
#pragma once

#include <torch/torch.h>

#include "engine/model/model_config.h"

namespace lorad::engine {

class RotaryEmbedding {
 public:
  RotaryEmbedding() = default;
  RotaryEmbedding(const RopeConfig& rope, int64_t head_dim, const torch::Device& device);

  // [head_dim / 2] f32 on the model's device.
  const torch::Tensor& inv_freq() const { return inv_freq_; }

  // cos and sin for integer positions [B, T]: each [B, T, head_dim] in `dtype`.
  std::pair<torch::Tensor, torch::Tensor> CosSin(const torch::Tensor& positions,
                                                 torch::ScalarType dtype) const;

  // x * cos + rotate_half(x) * sin for x [B, heads, T, head_dim] and cos/sin [B, T, head_dim].
  static torch::Tensor Apply(const torch::Tensor& x, const torch::Tensor& cos,
                             const torch::Tensor& sin);

 private:
  torch::Tensor inv_freq_;  // [head_dim / 2] f32
};

// transformers' inverse frequencies for `rope` and `head_dim`, [head_dim / 2] f32 on CPU.
torch::Tensor RopeInverseFrequencies(const RopeConfig& rope, int64_t head_dim);

}  // namespace lorad::engine
