// PagedKvCache: the model's AttentionCache over a pool of fixed-size blocks. Which blocks a
// sequence owns is decided by KvBlockAllocator (its block table); this class holds the tensors and
// does the reads and writes. Rows of one forward may belong to any sequences, each with its own
// block table and cached length (vLLM's PagedAttention layout, gathered with torch ops: on CPU a
// gather + scaled_dot_product_attention; a paged-attention kernel can replace Attend later).
//
// Pool per layer, K and V each: [num_blocks + 1, block_size, kv_heads, head_dim] in the compute
// dtype, viewed flat as slots [(num_blocks + 1) * block_size, kv_heads, head_dim]. The extra last
// block is scratch: padded positions of short rows write there and keys past a row's table read
// from there, so no sequence's blocks are touched by another row and every read is finite.
//
// Use per forward: Bind(rows) with each row's block table (covering its cached tokens plus the new
// ones) and cached length, then LlamaModel::Forward(batch, &cache, ...), which calls BeginStep /
// Attend / EndStep. Owned by the GPU loop thread; not thread-safe.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "engine/model/attention_cache.h"

namespace lorad::engine {

struct PagedKvCacheOptions {
  int64_t num_layers = 0;
  int64_t num_blocks = 0;
  int64_t block_size = 16;  // tokens per block
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_context = 0;  // most tokens one row may hold (the model's position limit)
  torch::ScalarType dtype = torch::kFloat;
  torch::Device device = torch::kCPU;
};

// One row of a forward: where its tokens live and how many are cached already.
struct PagedRow {
  std::vector<int32_t> block_table;  // block ids in token order
  int64_t cached = 0;                // tokens already written; new ones start at this position
  int64_t new_tokens = 0;            // tokens this forward brings (the table must cover them)
};

class PagedKvCache : public AttentionCache {
 public:
  explicit PagedKvCache(const PagedKvCacheOptions& options);

  // Bytes of K and V for one block across every layer (for sizing the pool from a budget).
  static int64_t BytesPerBlock(int64_t num_layers, int64_t block_size, int64_t kv_heads,
                               int64_t head_dim, torch::ScalarType dtype);

  // Sets the rows of the next forward. InvalidArgument when a table does not cover
  // cached + new_tokens, names a block outside the pool, or a row exceeds max_context.
  absl::Status Bind(std::vector<PagedRow> rows);
  // Bind's check of one row (b: its index, for the message); DecodeBatch checks its rows with it.
  absl::Status CheckRow(size_t b, const PagedRow& row) const;

  int64_t batch_size() const override { return static_cast<int64_t>(rows_.size()); }
  int64_t capacity() const override { return options_.max_context; }
  const std::vector<int64_t>& lengths() const override { return lengths_; }
  void BeginStep(int64_t tokens) override;
  torch::Tensor Attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                       const torch::Tensor& v) override;
  void EndStep(const std::vector<int64_t>& valid) override;

  const PagedKvCacheOptions& options() const { return options_; }
  int64_t bytes() const;

  // The pools of one layer, [slots, kv_heads, head_dim] (for DecodeBatch, which reads and writes
  // them with device-side indices).
  torch::Tensor& keys(int64_t layer) { return keys_.at(layer); }
  torch::Tensor& values(int64_t layer) { return values_.at(layer); }
  // The block no sequence owns: padding writes there (block id num_blocks).
  int32_t scratch_block() const { return static_cast<int32_t>(options_.num_blocks); }

 private:
  int64_t scratch_slot() const { return options_.num_blocks * options_.block_size; }
  // The pool slot of row `row`'s token at `position`, or the scratch slot past its table.
  int64_t SlotOf(const PagedRow& row, int64_t position) const;

  PagedKvCacheOptions options_;
  std::vector<torch::Tensor> keys_;    // per layer [slots, kv_heads, head_dim]
  std::vector<torch::Tensor> values_;  // per layer [slots, kv_heads, head_dim]
  std::vector<PagedRow> rows_;
  std::vector<int64_t> lengths_;  // [B] cached tokens per bound row
  // Set by BeginStep for the layers of one forward:
  int64_t tokens_ = 0;
  int64_t span_ = 0;           // keys gathered per row: the longest row after the step
  torch::Tensor write_slots_;  // [B * tokens] int64
  torch::Tensor read_slots_;   // [B * span] int64
  torch::Tensor mask_;         // [B, 1, tokens, span] bool, key position <= query position
  // Every row a whole prompt from position 0, none padded: the step attends to its own keys
  // only, causally, without the gather and the mask (the flash kernel on CUDA).
  bool fresh_ = false;
};

}  // namespace lorad::engine
