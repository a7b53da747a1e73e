// Optimizer: updates the trainer's LoRA parameters (fp32 master weights) from their .grad once per
// optimizer step. Two implementations, chosen by JobSpec.training.optimizer:
//   AdamW      ("adamw")       torch.optim.AdamW, fp32 moments, bit for bit on CPU:
//                              p *= 1 - lr*wd; m = lerp(m, g, 1-beta1); v = v*beta2 + (1-beta2)*g*g
//                              p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)
//   AdamW8bit  ("adamw_8bit")  bitsandbytes' bnb.optim.AdamW8bit (what transformers'
//                              optim="adamw_8bit" uses): parameters with >= min_8bit_size elements
//                              keep m and v as 8-bit block-wise dynamic codes
//                              (kernels/adamw8bit.h); smaller ones keep fp32 moments with
//                              bitsandbytes' 32-bit update (p *= 1 - lr*wd; p += -lr*c2/c1 * m /
//                              (sqrt(v) + eps*c2)).
// t counts the steps of each parameter: a parameter without .grad at a Step is skipped and its t
// does not advance (as in torch and bitsandbytes). Moments are allocated at a parameter's first
// update, on its device (CPU reference kernels or CUDA).
//
// Checkpoints: SaveState() returns CPU copies of every piece of state; LoadState() into a fresh
// optimizer over the same parameters restores it exactly, so the following updates equal those of
// an uninterrupted run bit for bit. Keys: "kind" (int64 [1]), "num_params" (int64 [1]), and per
// parameter index i that has stepped: "params.<i>.step" (int64 [1]) plus
//   AdamW:      "params.<i>.exp_avg", "params.<i>.exp_avg_sq"        fp32, the parameter's shape
//   AdamW8bit:  "params.<i>.state1", "params.<i>.state2"              uint8 (8-bit) or fp32, shape
//               "params.<i>.absmax1", "params.<i>.absmax2"           fp32 [ceil(numel/256)], 8-bit
//
// Thread rules: not thread-safe; the GPU loop thread owns the optimizer and its parameters.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lorad::engine {

enum class OptimizerKind { kAdamW, kAdamW8bit };

// "adamw", "adamw_8bit" (transformers' names).
absl::StatusOr<OptimizerKind> OptimizerKindFromName(const std::string& name);
const char* OptimizerKindName(OptimizerKind kind);

struct OptimizerOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // transformers' TrainingArguments default
  // AdamW8bit only: parameters with fewer elements keep fp32 moments (bitsandbytes' default).
  int64_t min_8bit_size = 4096;
};

// Betas in [0, 1), eps >= 0, weight_decay >= 0, min_8bit_size >= 1; errors name the field.
absl::Status ValidateOptimizerOptions(const OptimizerOptions& options);

// Named state tensors, as written into a training checkpoint.
using OptimizerState = std::map<std::string, torch::Tensor>;

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // Updates every parameter that has a gradient, in place, with learning rate `lr` (this step's
  // LrSchedule value). Errors (gradient of another shape, dtype or device, a parameter on a device
  // without a kernel) name the parameter index; parameters before it are already updated.
  virtual absl::Status Step(double lr) = 0;
  // Drops every parameter's gradient (torch's zero_grad(set_to_none=True)).
  void ZeroGrad();
  // Bytes of optimizer state for all parameters once each has stepped (the same before the first
  // Step, so the memory planner can budget it): moments, block scales and the 8-bit code books.
  virtual int64_t StateBytes() const = 0;
  virtual OptimizerState SaveState() const = 0;
  // Replaces the state with a SaveState() of the same kind over parameters of the same shapes.
  // On error (names the key) the optimizer's state is unchanged.
  virtual absl::Status LoadState(const OptimizerState& state) = 0;
  virtual OptimizerKind kind() const = 0;

  const std::vector<torch::Tensor>& params() const { return params_; }
  const OptimizerOptions& options() const { return options_; }

 protected:
  Optimizer(std::vector<torch::Tensor> params, const OptimizerOptions& options)
      : params_(std::move(params)), options_(options) {}

  std::vector<torch::Tensor> params_;
  OptimizerOptions options_;
};

// Parameters: defined, fp32, contiguous, distinct tensors (on CPU or CUDA; meta tensors are
// accepted for StateBytes() accounting but cannot Step). Errors name the parameter index.
absl::StatusOr<std::unique_ptr<Optimizer>> MakeOptimizer(OptimizerKind kind,
                                                         std::vector<torch::Tensor> params,
                                                         const OptimizerOptions& options = {});

}  // namespace lorad::engine
