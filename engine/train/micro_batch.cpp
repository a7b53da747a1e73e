#include "engine/train/micro_batch.h"

#include <torch/torch.h>

#include <algorithm>

namespace lorad::engine {

MicroBatchTensors MakeBatch(const std::vector<TokenizedExample>& rows,
                            const std::vector<int64_t>& indices) {
  int64_t width = 0;
  for (int64_t i : indices) {
    width = std::max<int64_t>(width, static_cast<int64_t>(rows[i].input_ids.size()));
  }
  const int64_t b = static_cast<int64_t>(indices.size());
  torch::Tensor ids = torch::zeros({b, width}, torch::kLong);
  torch::Tensor targets = torch::full({b, width}, kIgnoreLabel, torch::kLong);
  auto ids_a = ids.accessor<int64_t, 2>();
  auto targets_a = targets.accessor<int64_t, 2>();
  MicroBatchTensors out;
  for (int64_t r = 0; r < b; ++r) {
    const TokenizedExample& e = rows[indices[r]];
    const int64_t n = static_cast<int64_t>(e.input_ids.size());
    for (int64_t t = 0; t < n; ++t) ids_a[r][t] = e.input_ids[t];
    for (int64_t t = 0; t + 1 < n; ++t) targets_a[r][t] = e.labels[t + 1];
    out.batch.lengths.push_back(n);
    out.input_tokens += n;
  }
  out.batch.input_ids = ids;
  out.targets = targets.view({-1});
  return out;
}

}  // namespace lorad::engine
