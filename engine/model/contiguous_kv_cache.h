// ContiguousKvCache: an AttentionCache holding every row's keys and values in one contiguous
// tensor per layer, [B, kv_heads, capacity, head_dim]. Simple and exact; memory is reserved for
// the full capacity of every row (the paged cache in engine/infer shares blocks instead).
//
// Owned by one caller (the GPU loop or a test); not thread-safe.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "engine/model/attention_cache.h"

namespace lorad::engine {

struct ContiguousKvCacheOptions {
  int64_t num_layers = 0;
  int64_t batch_size = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t capacity = 0;  // tokens per row
  torch::ScalarType dtype = torch::kFloat;
  torch::Device device = torch::kCPU;
};

class ContiguousKvCache : public AttentionCache {
 public:
  explicit ContiguousKvCache(const ContiguousKvCacheOptions& options);

  int64_t batch_size() const override { return options_.batch_size; }
  int64_t capacity() const override { return options_.capacity; }
  const std::vector<int64_t>& lengths() const override { return lengths_; }
  void BeginStep(int64_t tokens) override;
  torch::Tensor Attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                       const torch::Tensor& v) override;
  void EndStep(const std::vector<int64_t>& valid) override;

  // Forgets every row's tokens (the memory stays reserved).
  void Clear();
  int64_t bytes() const;

 private:
  ContiguousKvCacheOptions options_;
  std::vector<torch::Tensor> keys_;    // per layer [B, kv_heads, capacity, head_dim]
  std::vector<torch::Tensor> values_;  // per layer [B, kv_heads, capacity, head_dim]
  std::vector<int64_t> lengths_;       // [B] tokens held per row
  // Set by BeginStep for the layers of one forward:
  int64_t span_ = 0;     // keys attended: max row length after the step
  torch::Tensor index_;  // [B, kv_heads, tokens, head_dim] int64 write positions
  torch::Tensor mask_;   // [B, 1, tokens, span] bool, key position <= query position
};

}  // namespace lorad::engine
