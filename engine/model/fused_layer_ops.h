// Torch-facing wrappers of kernels/layer_ops.h: the decoder layer's RMSNorm, rotary embedding and
// SiLU-times-up as one CUDA kernel each, forward and (for training) backward. LlamaModel uses them
// when UseFusedLayerOps says so (on the GPU), otherwise the reference torch ops. Same roundings
// as the torch ops and their autograd; the sums of RMSNorm are reduced in another order.
// When autograd records, each goes through an autograd Function whose backward is one kernel
// too, in place of the 5-15 ops autograd would run for the reference ops; the norm weight, cos
// and sin must be frozen (lorad trains LoRA weights only).
#pragma once

#include <torch/torch.h>

#include <utility>

namespace lorad::engine {

enum class FusedLayerOps {
  kOff,
  kCuda,       // the default: on CUDA tensors
  kAlsoOnCpu,  // tests: CPU tensors too, through the kernels' CPU references
};

// fp32 or bf16 on a device the mode covers.
bool UseFusedLayerOps(const torch::Tensor& x);
// Process-wide switch, for benchmarks and tests that compare the fused and the torch paths.
void SetFusedLayerOps(FusedLayerOps mode);

// x [..., width], weight [width] of x's dtype.
torch::Tensor FusedRmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
// The residual add and the RMSNorm after it: (x + delta, FusedRmsNorm(x + delta, weight, eps)),
// as one kernel (under autograd too: its backward is the norm's kernel plus d(sum)).
std::pair<torch::Tensor, torch::Tensor> FusedAddRmsNorm(const torch::Tensor& x,
                                                        const torch::Tensor& delta,
                                                        const torch::Tensor& weight, double eps);
// x [B, T, heads, head_dim]; cos, sin [B, T, head_dim]: RotaryEmbedding::Apply in the layout the
// projection produced (before the heads are transposed). Its backward needs sin[d] == sin[d +
// head_dim / 2], as RotaryEmbedding::CosSin makes it.
torch::Tensor FusedRotary(const torch::Tensor& x, const torch::Tensor& cos,
                          const torch::Tensor& sin);
// silu(gate) * up, same shapes.
torch::Tensor FusedSiluMul(const torch::Tensor& gate, const torch::Tensor& up);

}  // namespace lorad::engine
