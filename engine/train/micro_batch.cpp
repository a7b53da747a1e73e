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
  // Rows of packed examples kept apart: positions start again at each example (padding goes on
  // from the row's last one); the model attends within each.
  const bool packed = std::any_of(indices.begin(), indices.end(),
                                  [&](int64_t i) { return !rows[i].example_starts.empty(); });
  if (packed) {
    torch::Tensor positions = torch::zeros({b, width}, torch::kLong);
    auto positions_a = positions.accessor<int64_t, 2>();
    for (int64_t r = 0; r < b; ++r) {
      const std::vector<int32_t>& starts = rows[indices[r]].example_starts;
      int64_t start = 0;
      size_t next = 0;
      for (int64_t t = 0; t < width; ++t) {
        if (next < starts.size() && t == starts[next]) start = starts[next++];
        positions_a[r][t] = t - start;
      }
    }
    out.batch.positions = positions;
  }
  return out;
}

}  // namespace lorad::engine
