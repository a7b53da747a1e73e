// Torch-facing wrappers of kernels/layer_ops.h: the decoder layer's RMSNorm, rotary embedding and
// SiLU-times-up as one CUDA kernel each, for inference on the GPU (LlamaModel uses them when
// UseFusedLayerOps says so; otherwise, on CPU and whenever autograd records, the reference torch
// ops). Same roundings as the torch ops; RMSNorm's sum of squares is reduced in another order.
#pragma once

#include <torch/torch.h>

namespace lorad::engine {

enum class FusedLayerOps {
  kOff,
  kCuda,       // the default: on CUDA tensors
  kAlsoOnCpu,  // tests: CPU tensors too, through the kernels' CPU references
};

// fp32 or bf16 on a device the mode covers, nothing for autograd to record.
bool UseFusedLayerOps(const torch::Tensor& x);
// Process-wide switch, for benchmarks and tests that compare the fused and the torch paths.
void SetFusedLayerOps(FusedLayerOps mode);

// While one lives, this thread uses the torch ops. Training forwards hold one: a checkpointed layer
// runs its first forward without autograd and its recompute with it, and both must compute the
// same values.
class ScopedTorchLayerOps {
 public:
  ScopedTorchLayerOps();
  ~ScopedTorchLayerOps();
  ScopedTorchLayerOps(const ScopedTorchLayerOps&) = delete;
  ScopedTorchLayerOps& operator=(const ScopedTorchLayerOps&) = delete;
};

// x [..., width], weight [width] of x's dtype.
torch::Tensor FusedRmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
// x [B, T, heads, head_dim]; cos, sin [B, T, head_dim]: RotaryEmbedding::Apply in the layout the
// projection produced (before the heads are transposed).
torch::Tensor FusedRotary(const torch::Tensor& x, const torch::Tensor& cos,
                          const torch::Tensor& sin);
// silu(gate) * up, same shapes.
torch::Tensor FusedSiluMul(const torch::Tensor& gate, const torch::Tensor& up);

}  // namespace lorad::engine
