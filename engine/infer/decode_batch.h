// DecodeBatch: the inputs of one decode step (one new token per row) held in device buffers of a
// fixed size, and the AttentionCache that step uses over a PagedKvCache's pools. Nothing in the
// step's forward copies from the host or waits for the device: Fill() stages every index (token
// ids, positions, KV write slots, block tables, context lengths, adapter slots) and copies them in
// two asynchronous transfers before the forward, and the forward reads them on the device. So a
// CUDA graph captured over LlamaModel::DecodeStep with this batch replays correctly after every
// Fill() (engine/infer/decode_runner.h).
//
// Attention runs the paged decode kernel (kernels/paged_attention.h: its CPU reference on CPU), so
// a sequence's keys are read where its blocks lie, with no gather. Rows past the filled ones are
// padding: token 0 at position 0, writing and reading the cache's scratch block only.
//
// Owned by the GPU loop thread; not thread-safe.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "engine/infer/paged_kv_cache.h"
#include "engine/model/attention_cache.h"
#include "kernels/paged_attention.h"

#if defined(LORAD_WITH_CUDA)
#include <ATen/cuda/CUDAEvent.h>
#endif

namespace lorad::engine {

// One decode row: the token it brings and where the sequence's keys are.
struct DecodeRow {
  int64_t token = 0;
  int64_t position = 0;              // tokens already cached; the new one goes here
  std::vector<int32_t> block_table;  // must cover position + 1 tokens
  int32_t lora_slot = -1;            // the row's slot in the LoraStack; < 0: no adapter
};

class DecodeBatch : public AttentionCache {
 public:
  // Buffers for up to `rows` rows over `cache` (which must outlive this batch).
  DecodeBatch(PagedKvCache* cache, int64_t rows);

  // Stages `rows` (at most rows() of them; the rest become padding) and copies them to the device.
  // Rows without an adapter, and padding, get lora slot `none_lora_slot` (the stack's none slot).
  // InvalidArgument when a table does not cover its position, names a block outside the pool, or
  // the position reaches the context limit.
  absl::Status Fill(const std::vector<DecodeRow>& rows, int32_t none_lora_slot);

  int64_t rows() const { return rows_; }
  const torch::Tensor& ids() const { return ids_; }                // [rows] int64
  const torch::Tensor& positions() const { return positions_; }    // [rows] int64
  const torch::Tensor& lora_slots() const { return lora_slots_; }  // [rows] int32

  // AttentionCache: BeginStep and EndStep do nothing (positions come from positions()); Attend
  // takes one token per row.
  int64_t batch_size() const override { return rows_; }
  int64_t capacity() const override { return cache_->options().max_context; }
  const std::vector<int64_t>& lengths() const override { return lengths_; }
  void BeginStep(int64_t tokens) override;
  torch::Tensor Attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                       const torch::Tensor& v) override;
  // The fused path on fp32 or bf16 when q, k, v and the pools share a dtype (else undefined):
  // rotary of q and k and the cache write, then the paged attention; on CUDA one launch
  // (kernels/paged_attention_rotary_cuda), on CPU the references of rotary_store and the
  // attention.
  torch::Tensor AttendRotating(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& cos,
                               const torch::Tensor& sin) override;
  void EndStep(const std::vector<int64_t>& valid) override;

 private:
  // The paged attention of q [rows, heads, head_dim] (the pools' dtype, contiguous) over layer
  // `layer`'s cache: [rows, heads, 1, head_dim].
  // rotary: the step's rotary and cache write done by the attention launch (CUDA only); q then
  // is the projection's q before rotation.
  torch::Tensor PagedAttend(int64_t layer, const torch::Tensor& q,
                            const kernels::PagedAttentionRotary* rotary = nullptr);

  PagedKvCache* cache_;
  int64_t rows_;
  int64_t max_blocks_;
  std::vector<int64_t> lengths_;  // host copy of the positions (for the interface)
  // Host staging (pinned on CUDA) and the device buffers they are copied into; the named tensors
  // below are views of the device buffers, so their addresses never change.
  torch::Tensor host_longs_, host_ints_, device_longs_, device_ints_;
  torch::Tensor ids_, positions_, write_slots_;             // int64 views
  torch::Tensor context_lens_, block_tables_, lora_slots_;  // int32 views
#if defined(LORAD_WITH_CUDA)
  // The last Fill's copies out of the host buffers, which the next Fill waits for before it
  // rewrites them (in a running engine they finished long before: the step ended with its tokens'
  // copy to the host).
  std::optional<at::cuda::CUDAEvent> copied_;
#endif
};

}  // namespace lorad::engine
