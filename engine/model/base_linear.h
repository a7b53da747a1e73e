// BaseLinear: one frozen projection of the base model, y = x W^T (+ b), with W held either as a
// float tensor (exact, for parity and small models) or as NF4 (QLoRA: 4-bit, shared by every
// adapter). The base is immutable after load: W never requires grad, and gradients flow through
// a BaseLinear to its input only.
//
// The NF4 path records no dequantized weight for backward: a custom autograd function
// dequantizes again in backward (dx = dy W), as QLoRA does, so training memory holds 4-bit
// weights only. The exception is a checkpointed layer's recompute (InCheckpointRecompute), whose
// backward follows at once: it keeps the weight it dequantized, for one layer at a time.
#pragma once

#include <torch/torch.h>

#include <optional>
#include <vector>

#include "engine/model/nf4_tensor.h"

namespace lorad::engine {

class BaseLinear {
 public:
  BaseLinear() = default;
  // weight [out, in] float; bias [out] or undefined.
  static BaseLinear Float(torch::Tensor weight, torch::Tensor bias = {});
  static BaseLinear Nf4(Nf4Tensor weight, torch::Tensor bias = {});

  // x [..., in] -> [..., out] in x's dtype. Throws c10::Error on a wrong in_features.
  torch::Tensor Forward(const torch::Tensor& x) const;
  // Forward's autograd graph without its value: the result has Forward's shape and dtype but
  // undefined values (no product is computed), and its backward is Forward's (dx = dy W). For a
  // product nothing reads: a checkpointed piece's recompute runs only for its backward, which
  // never reads the piece's output, so its last projection need not be computed (o_proj and
  // down_proj: at Llama-3-8B shapes a 4096 x 4096 and a 4096 x 14336 product per layer and
  // step). Without a gradient to record it is
  // Forward(x). The result's backward uses this BaseLinear, which must outlive it.
  torch::Tensor ForwardGraphOnly(const torch::Tensor& x) const;
  // Forward of several projections on one x (q, k, v; gate, up). All NF4: through
  // Nf4Tensor::LinearGroup (one kernel launch on CUDA) when no gradient is recorded, else as
  // Forward for each but with one backward node whose products accumulate dx themselves (no add
  // kernel per further weight). Otherwise one Forward each. Without `value_needed`, as
  // ForwardGraphOnly: the graph without the values.
  static std::vector<torch::Tensor> ForwardShared(const std::vector<const BaseLinear*>& linears,
                                                  const torch::Tensor& x, bool value_needed = true);

  // The MLP's activation silu(gate(x)) * up(x) in one launch (Nf4Tensor::SiluMulProduct) when
  // both are NF4 without bias and that launch applies; undefined otherwise.
  static torch::Tensor SiluMulShared(const BaseLinear& gate, const BaseLinear& up,
                                     const torch::Tensor& x);

  bool quantized() const { return nf4_.has_value(); }
  int64_t in_features() const;
  int64_t out_features() const;
  // Device bytes of the weight (and bias).
  int64_t bytes() const;
  // Every tensor held: weight or NF4 parts, and bias.
  std::vector<torch::Tensor> tensors() const;
  // The float weight (undefined when quantized) and the bias (maybe undefined).
  const torch::Tensor& weight() const { return weight_; }
  const torch::Tensor& bias() const { return bias_; }
  // The weight as a dense [out, in] tensor of `dtype` (dequantized when NF4).
  torch::Tensor DenseWeight(torch::ScalarType dtype) const;

 private:
  torch::Tensor weight_;          // [out, in], float path only
  std::optional<Nf4Tensor> nf4_;  // NF4 path only
  torch::Tensor bias_;            // [out] or undefined
};

}  // namespace lorad::engine
