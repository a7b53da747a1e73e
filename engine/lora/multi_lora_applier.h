// MultiLoraApplier: a LoraApplier where every row of the batch names its own adapter (or none), so
// requests for different adapters share one forward (S-LoRA / Punica's BGMV semantics):
//
//   y[b] += scale[s_b] * (x[b] @ A[s_b]^T) @ B[s_b]^T     s_b = row b's slot, none -> zero slot
//
// computed for the whole batch. Decode rows (one token each) on CUDA go through the BGMV kernel
// (kernels/lora_bgmv.h: fp32 sums, y rounded once, each row reads only its own adapter; q, k, v
// and gate, up each as one launch pair through ApplyShared); every
// other case uses gathers and batched matmuls in torch. Adapters of different ranks share a stack:
// each is zero-padded to the largest rank, which adds exact zeros. Rows with no adapter get the
// all-zero slot, so their outputs are the base's.
//
// LoraStack holds the stacked weights of one set of adapters and is built once per set (the
// engine caches it while the set of adapters in its batches does not change).
#pragma once

#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/lora/lora_adapter.h"
#include "engine/lora/lora_applier.h"

namespace lorad::engine {

class LoraStack {
 public:
  // Stacks `adapters` (slot i = adapters[i]; slot adapters.size() = none) for `num_layers` layers
  // on `device` in `dtype`. The adapters may be freed afterwards: the stack holds copies.
  static absl::StatusOr<std::shared_ptr<const LoraStack>> Build(
      const std::vector<const LoraAdapter*>& adapters, int64_t num_layers, torch::Device device,
      torch::ScalarType dtype);

  int32_t num_adapters() const { return num_adapters_; }
  int32_t none_slot() const { return num_adapters_; }

  struct Entry {
    torch::Tensor a;  // [slots + 1, r_max, in]; undefined when no adapter targets this
    torch::Tensor b;  // [slots + 1, out, r_max]
    // [slots + 1] fp32, 0 for the none slot: PEFT multiplies by its float scaling (rounded to
    // bf16, 1.3333 was 1.3359: every prefill delta 0.2% off, decode's kernels unaffected).
    torch::Tensor scale;
    // The BGMV kernel's table over the adapter slots (not the none slot), used on CUDA: arrays
    // of a[s] and b[s] pointers (int64), ranks (int32, all r_max) and scales (fp32), on the
    // stack's device.
    torch::Tensor a_pointers, b_pointers, ranks, scales_f32;
  };
  const Entry& entry(int64_t layer, Projection projection) const {
    return entries_.at(layer)[static_cast<int>(projection)];
  }
  int64_t bytes() const;

 private:
  int32_t num_adapters_ = 0;
  std::vector<std::array<Entry, kNumProjections>> entries_;  // [layer][projection]
};

class MultiLoraApplier : public LoraApplier {
 public:
  // row_slots[b]: row b's slot in `stack`, or -1 for the base model. Inference only (no dropout,
  // no autograd into the stack).
  MultiLoraApplier(std::shared_ptr<const LoraStack> stack, const std::vector<int32_t>& row_slots,
                   torch::Device device);
  // row_slots: [B] int32 on the stack's device, already mapped (none -> stack->none_slot()). The
  // tensor is read at every Apply, so a caller may refill it in place between forwards (a
  // captured CUDA graph keeps reading the same buffer).
  MultiLoraApplier(std::shared_ptr<const LoraStack> stack, torch::Tensor row_slots);
  torch::Tensor Apply(int64_t layer, Projection projection, const torch::Tensor& x,
                      const torch::Tensor& y) const override;
  std::vector<torch::Tensor> ApplyShared(int64_t layer, const std::vector<Projection>& projections,
                                         const torch::Tensor& x,
                                         const std::vector<torch::Tensor>& ys) const override;
  bool Targets(int64_t layer, Projection projection) const override {
    return stack_->entry(layer, projection).a.defined();
  }

 private:
  // The BGMV kernels, in place on `ys`, for decode rows on CUDA; false (nothing done) when the
  // inputs are not such rows, and the torch path must add the updates.
  bool AddOnDevice(int64_t layer, const std::vector<Projection>& projections,
                   const torch::Tensor& x, const std::vector<torch::Tensor>& ys) const;

  std::shared_ptr<const LoraStack> stack_;
  torch::Tensor rows_;  // [B] int32 slot per row (none -> stack's none slot)
};

}  // namespace lorad::engine
