#include "engine/model/rope.h"

#include <cmath>

namespace lorad::engine {

torch::Tensor RopeInverseFrequencies(const RopeConfig& rope, int64_t head_dim) {
  // The same ops in the same order as transformers, so the fp32 values agree bit for bit:
  // 1.0 / (base ** (arange(0, dim, 2).float() / dim)).
  const torch::Tensor exponents =
      torch::arange(0, head_dim, 2, torch::kLong).to(torch::kFloat) / static_cast<double>(head_dim);
  torch::Tensor inv_freq = 1.0 / torch::pow(rope.theta, exponents);
  if (rope.type != "llama3") return inv_freq;

  const double factor = rope.factor;
  const double low = rope.low_freq_factor;
  const double high = rope.high_freq_factor;
  const double old_context = static_cast<double>(rope.original_max_position_embeddings);
  const double low_freq_wavelen = old_context / low;
  const double high_freq_wavelen = old_context / high;
  const torch::Tensor wavelen = 2 * M_PI / inv_freq;
  // Long wavelengths (low frequencies) are divided by factor; short ones kept.
  torch::Tensor scaled = torch::where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq);
  const torch::Tensor smooth = (old_context / wavelen - low) / (high - low);
  const torch::Tensor smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
  const torch::Tensor medium = torch::logical_not(wavelen < high_freq_wavelen) *
                               torch::logical_not(wavelen > low_freq_wavelen);
  return torch::where(medium, smoothed, scaled);
}

RotaryEmbedding::RotaryEmbedding(const RopeConfig& rope, int64_t head_dim,
                                 const torch::Device& device)
    : inv_freq_(RopeInverseFrequencies(rope, head_dim).to(device)) {}

std::pair<torch::Tensor, torch::Tensor> RotaryEmbedding::CosSin(const torch::Tensor& positions,
                                                                torch::ScalarType dtype) const {
  // freqs[b, t, i] = positions[b, t] * inv_freq[i], as transformers' fp32 batched matmul
  // (inv_freq [B, D/2, 1] @ positions [B, 1, T]) computes it: one product per element.
  const torch::Tensor freqs = positions.to(torch::kFloat).unsqueeze(-1) * inv_freq_;
  const torch::Tensor emb = torch::cat({freqs, freqs}, -1);  // [B, T, head_dim]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

torch::Tensor RotaryEmbedding::Apply(const torch::Tensor& x, const torch::Tensor& cos,
                                     const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const torch::Tensor rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1);
}

}  // namespace lorad::engine
