// LoraApplier: adds LoRA updates to the outputs of the base model's projections. The seam between
// the model's forward and how adapters are applied: the model calls Apply after every targeted
// projection and knows nothing else about adapters.
//
// Semantics, per targeted projection with input x [..., in] and base output y [..., out]:
//   y += scaling * dropout(x) @ A^T @ B^T      A [r, in], B [out, r]
// dropout only in training. SingleLoraApplier applies one adapter to every row with torch ops; a
// multi-adapter implementation (an adapter index per row, SGMV/BGMV kernels) implements the same
// interface.
#pragma once

#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/lora/lora_adapter.h"

namespace lorad::engine {

// The seven projections of a decoder layer, in PEFT's order.
enum class Projection { kQ, kK, kV, kO, kGate, kUp, kDown };
constexpr int kNumProjections = 7;

// "q_proj", ..., "down_proj".
const char* ProjectionName(Projection projection);
// "model.layers.{layer}.self_attn.q_proj" / "model.layers.{layer}.mlp.gate_proj".
std::string ProjectionPath(int64_t layer, Projection projection);

class LoraApplier {
 public:
  virtual ~LoraApplier() = default;
  // x [..., in] the projection's input, y [..., out] its base output; returns y plus the update
  // (y itself when no adapter targets this projection). May add into y in place and return it:
  // the caller hands over y, which nothing else may read.
  virtual torch::Tensor Apply(int64_t layer, Projection projection, const torch::Tensor& x,
                              const torch::Tensor& y) const = 0;
  // Projections that share their input x (q, k and v; gate and up) with their base outputs `ys`
  // in the same order: returns each y plus its update, as Apply on each in turn (which is what
  // this default does; a multi-adapter applier adds them all in one launch).
  virtual std::vector<torch::Tensor> ApplyShared(int64_t layer,
                                                 const std::vector<Projection>& projections,
                                                 const torch::Tensor& x,
                                                 const std::vector<torch::Tensor>& ys) const;
  // ApplyShared's autograd graph (the same backward) where the caller replaces the values it
  // returns (a checkpointed recompute given parked values: WithParkedValue): an applier may skip
  // computing them. This default computes them.
  virtual std::vector<torch::Tensor> ApplySharedGraphOnly(
      int64_t layer, const std::vector<Projection>& projections, const torch::Tensor& x,
      const std::vector<torch::Tensor>& ys) const {
    return ApplyShared(layer, projections, x, ys);
  }
  // Whether Apply may change this projection's output (false: it returns y as it is), so the
  // model may fuse what follows the base product (the MLP's gate and up with their activation).
  virtual bool Targets(int64_t layer, Projection projection) const = 0;
};

// One adapter for every row of the batch. The adapter's tensors are used as they are when their
// device and dtype match x (so gradients reach them directly in training), cast otherwise.
// Borrows `adapter`, which must outlive the applier (and, in training, the backward pass).
class SingleLoraApplier : public LoraApplier {
 public:
  SingleLoraApplier(const LoraAdapter& adapter, int64_t num_layers, bool train);
  torch::Tensor Apply(int64_t layer, Projection projection, const torch::Tensor& x,
                      const torch::Tensor& y) const override;
  // Without dropout (which draws a mask per projection), the projections' A matrices are stacked
  // so one product x [A_1; A_2; ...]^T serves them all: x is read once instead of once per
  // projection, and in backward one product gives their whole share of dx (and one their A
  // gradients) instead of one product and one sum each.
  std::vector<torch::Tensor> ApplyShared(int64_t layer, const std::vector<Projection>& projections,
                                         const torch::Tensor& x,
                                         const std::vector<torch::Tensor>& ys) const override {
    return ApplySharedOrGraph(layer, projections, x, ys, /*value_needed=*/true);
  }
  // The updates' graph without their products (the [..., out] GEMMs that add h B^T into y).
  std::vector<torch::Tensor> ApplySharedGraphOnly(
      int64_t layer, const std::vector<Projection>& projections, const torch::Tensor& x,
      const std::vector<torch::Tensor>& ys) const override {
    return ApplySharedOrGraph(layer, projections, x, ys, /*value_needed=*/false);
  }
  bool Targets(int64_t layer, Projection projection) const override {
    return pairs_.at(layer)[static_cast<int>(projection)] != nullptr;
  }

 private:
  torch::Tensor ApplyOrGraph(int64_t layer, Projection projection, const torch::Tensor& x,
                             const torch::Tensor& y, bool value_needed) const;
  std::vector<torch::Tensor> ApplySharedOrGraph(int64_t layer,
                                                const std::vector<Projection>& projections,
                                                const torch::Tensor& x,
                                                const std::vector<torch::Tensor>& ys,
                                                bool value_needed) const;
  // y + scaling * h B^T, in place on y where one GEMM can do it. Without `value_needed`, that
  // GEMM's autograd node without its product: the result's value is y's.
  torch::Tensor AddUpdate(const torch::Tensor& y, const torch::Tensor& h, const torch::Tensor& b,
                          bool value_needed) const;

  double scaling_ = 1;
  double dropout_ = 0;
  bool train_ = false;
  // [layer][projection] -> the adapter's pair, or nullptr when not targeted.
  std::vector<std::array<const LoraPair*, kNumProjections>> pairs_;
};

}  // namespace lorad::engine
