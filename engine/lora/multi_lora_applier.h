// MultiLoraApplier: a LoraApplier where every row of the batch names its own adapter (or none), so
// requests for different adapters share one forward (S-LoRA / Punica's BGMV semantics):
//
//   y[b] += scale[s_b] * (x[b] @ A[s_b]^T) @ B[s_b]^T     s_b = row b's slot (none: y[b] as is)
//
// computed for the whole batch. Decode rows (one token each) on CUDA go through the BGMV kernel
// (kernels/lora_bgmv.h: fp32 sums, y rounded once, each row reads only its own adapter at its own
// rank; q, k, v and gate, up each as one launch pair through ApplyShared); every other case
// (prefill pieces, the CPU) uses batched matmuls in torch over each row's adapter (gathered for
// the call, padded to the largest rank among them: exact zeros). Rows with no adapter get an
// all-zero slot, so their outputs are the base's.
//
// LoraStack names one set of adapters (slot i = the step's i-th adapter) and is built once per set
// (the engine caches it while the set of adapters in its batches does not change). It does not
// copy the adapters: its entries are the adapter store's device tensors themselves, so serving
// adapters of ranks 8 and 128 side by side costs their own bytes, not eight copies padded to 128.
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
  // Names `adapters` (slot i = adapters[i]; slot adapters.size() = none) for `num_layers` layers
  // on `device` in `dtype`. The stack shares the adapters' tensors where they are already on
  // `device` in `dtype` and contiguous (as the adapter store's device copies are) and copies them
  // otherwise; the shared tensors stay allocated while the stack lives, whatever happens to the
  // LoraAdapter objects.
  static absl::StatusOr<std::shared_ptr<const LoraStack>> Build(
      const std::vector<const LoraAdapter*>& adapters, int64_t num_layers, torch::Device device,
      torch::ScalarType dtype);

  int32_t num_adapters() const { return num_adapters_; }
  int32_t none_slot() const { return num_adapters_; }
  torch::ScalarType dtype() const { return dtype_; }  // of every entry's tensors

  struct Entry {
    // Per slot (not the none slot): A [r_s, in] and B [out, r_s] at the adapter's own rank r_s,
    // undefined where that adapter does not target this projection.
    std::vector<torch::Tensor> a, b;
    // Per slot, the adapter's float scaling (PEFT multiplies by it in fp32; rounded to bf16,
    // 1.3333 was 1.3359: every prefill delta 0.2% off); 0 where the adapter does not target this.
    std::vector<float> scale;
    int32_t max_rank = 0;  // the largest r_s; 0: no adapter of the set targets this projection
    int64_t in_features = 0, out_features = 0;
    // The BGMV kernel's table over the slots, used on CUDA: arrays of a[s] and b[s] pointers
    // (int64; null for rank 0), ranks (int32, r_s or 0) and scales (fp32), on the stack's device.
    torch::Tensor a_pointers, b_pointers, ranks, scales_f32;
    bool targeted() const { return max_rank > 0; }
  };
  const Entry& entry(int64_t layer, Projection projection) const {
    return entries_.at(layer)[static_cast<int>(projection)];
  }
  // Device bytes the stack itself holds: the kernels' tables, and any adapter tensor it had to
  // copy (another device or dtype). Tensors shared with the adapter store are the store's bytes.
  int64_t bytes() const { return own_bytes_; }

 private:
  int32_t num_adapters_ = 0;
  torch::ScalarType dtype_ = torch::kFloat;
  int64_t own_bytes_ = 0;
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
    return stack_->entry(layer, projection).targeted();
  }

 private:
  // The BGMV kernels, in place on `ys`, for decode rows on CUDA; false (nothing done) when the
  // inputs are not such rows, and the torch path must add the updates.
  bool AddOnDevice(int64_t layer, const std::vector<Projection>& projections,
                   const torch::Tensor& x, const std::vector<torch::Tensor>& ys) const;

  // The torch path's per-row A, B and scale for this call: every row's adapter gathered from a
  // stack of the step's adapters made for the call (each padded to the largest rank among them:
  // exact zeros; base rows get an all-zero slot), as the old persistent stack was, but freed
  // after the call.
  struct Gathered {
    torch::Tensor a, b, scale;  // [B, r, in], [B, out, r] in x's dtype; [B, 1, 1] fp32
  };
  Gathered Gather(const LoraStack::Entry& e, torch::ScalarType dtype) const;

  std::shared_ptr<const LoraStack> stack_;
  torch::Tensor rows_;  // [B] int32 slot per row (none -> stack's none slot)
  // The one slot every row uses, where the first constructor saw one: a batch on one adapter (its
  // tensors are used as they are, nothing gathered) or on none (no delta). -1 otherwise.
  int32_t uniform_slot_ = -1;
};

}  // namespace lorad::engine
