// ContiguousKvCache: rows of different lengths advance independently, and attention over the
// cache equals causal attention over the whole sequence.
#include "engine/model/contiguous_kv_cache.h"

#include <gtest/gtest.h>

namespace lorad::engine {
namespace {

ContiguousKvCacheOptions Options(int64_t rows) {
  ContiguousKvCacheOptions o;
  o.num_layers = 1;
  o.batch_size = rows;
  o.kv_heads = 1;
  o.head_dim = 4;
  o.capacity = 8;
  return o;
}

TEST(ContiguousKvCacheTest, StepwiseAttentionEqualsCausalAttentionOverTheSequence) {
  torch::manual_seed(0);
  const int64_t T = 6;
  // Two query heads share one KV head (GQA).
  const torch::Tensor q = torch::randn({1, 2, T, 4});
  const torch::Tensor k = torch::randn({1, 1, T, 4});
  const torch::Tensor v = torch::randn({1, 1, T, 4});
  const torch::Tensor want = GroupedQueryAttention(q, k, v, torch::Tensor());

  ContiguousKvCache cache(Options(1));
  cache.BeginStep(4);  // prefill 4, then decode 2 one at a time
  torch::Tensor got = cache.Attend(0, q.narrow(2, 0, 4), k.narrow(2, 0, 4), v.narrow(2, 0, 4));
  cache.EndStep({4});
  for (int64_t t = 4; t < T; ++t) {
    cache.BeginStep(1);
    got = torch::cat(
        {got, cache.Attend(0, q.narrow(2, t, 1), k.narrow(2, t, 1), v.narrow(2, t, 1))}, 2);
    cache.EndStep({1});
  }
  EXPECT_TRUE(torch::allclose(got, want, 1e-5, 1e-6));
  EXPECT_EQ(cache.lengths(), std::vector<int64_t>{6});
}

TEST(ContiguousKvCacheTest, PaddedRowsKeepOnlyTheirValidTokens) {
  ContiguousKvCache cache(Options(2));
  EXPECT_EQ(cache.capacity(), 8);
  EXPECT_EQ(cache.bytes(), 2 * 2 * 8 * 4 * 4);  // keys + values, 2 rows x 8 tokens x 4 floats
  cache.BeginStep(3);
  cache.Attend(0, torch::randn({2, 1, 3, 4}), torch::randn({2, 1, 3, 4}),
               torch::randn({2, 1, 3, 4}));
  cache.EndStep({3, 1});
  EXPECT_EQ(cache.lengths(), (std::vector<int64_t>{3, 1}));
  cache.Clear();
  EXPECT_EQ(cache.lengths(), (std::vector<int64_t>{0, 0}));
}

}  // namespace
}  // namespace lorad::engine
