#include "engine/model/contiguous_kv_cache.h"

#include <algorithm>

namespace lorad::engine {

ContiguousKvCache::ContiguousKvCache(const ContiguousKvCacheOptions& options)
    : options_(options), lengths_(static_cast<size_t>(options.batch_size), 0) {
  const auto tensor_options = torch::TensorOptions().dtype(options.dtype).device(options.device);
  for (int64_t layer = 0; layer < options.num_layers; ++layer) {
    // Zeros, not empty: padded rows attend to unwritten slots, which must hold finite values.
    keys_.push_back(
        torch::zeros({options.batch_size, options.kv_heads, options.capacity, options.head_dim},
                     tensor_options));
    values_.push_back(torch::zeros_like(keys_.back()));
  }
}

void ContiguousKvCache::BeginStep(int64_t tokens) {
  const auto device = options_.device;
  const torch::Tensor start =
      torch::tensor(lengths_, torch::kLong).to(device).view({-1, 1});  // [B, 1]
  const torch::Tensor positions =
      start +
      torch::arange(tokens, torch::TensorOptions().dtype(torch::kLong).device(device));  // [B, T]
  span_ = *std::max_element(lengths_.begin(), lengths_.end()) + tokens;
  index_ = positions.view({options_.batch_size, 1, tokens, 1})
               .expand({options_.batch_size, options_.kv_heads, tokens, options_.head_dim});
  const torch::Tensor key_positions =
      torch::arange(span_, torch::TensorOptions().dtype(torch::kLong).device(device));
  mask_ =
      (key_positions.view({1, 1, 1, span_}) <= positions.view({options_.batch_size, 1, tokens, 1}));
}

torch::Tensor ContiguousKvCache::Attend(int64_t layer, const torch::Tensor& q,
                                        const torch::Tensor& k, const torch::Tensor& v) {
  torch::Tensor& keys = keys_.at(layer);
  torch::Tensor& values = values_.at(layer);
  keys.scatter_(2, index_, k.to(keys.scalar_type()));
  values.scatter_(2, index_, v.to(values.scalar_type()));
  return GroupedQueryAttention(q, keys.narrow(2, 0, span_), values.narrow(2, 0, span_), mask_);
}

void ContiguousKvCache::EndStep(const std::vector<int64_t>& valid) {
  for (size_t b = 0; b < lengths_.size(); ++b) lengths_[b] += valid.at(b);
  index_ = torch::Tensor();
  mask_ = torch::Tensor();
}

void ContiguousKvCache::Clear() { std::fill(lengths_.begin(), lengths_.end(), 0); }

int64_t ContiguousKvCache::bytes() const {
  int64_t n = 0;
  for (size_t i = 0; i < keys_.size(); ++i) {
    n += static_cast<int64_t>(keys_[i].nbytes() + values_[i].nbytes());
  }
  return n;
}

}  // namespace lorad::engine
