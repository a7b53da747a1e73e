// RotaryEmbedding: the inverse frequencies (default and llama3), and that the rotation keeps
// lengths and makes attention scores depend on relative position only.
#include "engine/model/rope.h"

#include <gtest/gtest.h>

#include <cmath>

namespace lorad::engine {
namespace {

TEST(RopeTest, DefaultFrequenciesAreThetaPowers) {
  RopeConfig rope;
  rope.theta = 10000;
  const torch::Tensor f = RopeInverseFrequencies(rope, 8);
  ASSERT_EQ(f.sizes(), (std::vector<int64_t>{4}));
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(f[i].item<double>(), 1.0 / std::pow(10000.0, 2.0 * i / 8), 1e-7);
  }
}

TEST(RopeTest, Llama3KeepsHighFrequenciesAndDividesLowOnes) {
  RopeConfig plain;
  plain.theta = 500000;
  RopeConfig scaled = plain;
  scaled.type = "llama3";
  scaled.factor = 8;
  scaled.low_freq_factor = 1;
  scaled.high_freq_factor = 4;
  scaled.original_max_position_embeddings = 64;
  const torch::Tensor f = RopeInverseFrequencies(plain, 16);
  const torch::Tensor g = RopeInverseFrequencies(scaled, 16);
  int kept = 0, divided = 0, between = 0;
  for (int i = 0; i < 8; ++i) {
    const double wavelen = 2 * M_PI / f[i].item<double>();
    const double ratio = g[i].item<double>() / f[i].item<double>();
    if (wavelen < 64.0 / 4) {
      EXPECT_NEAR(ratio, 1.0, 1e-6) << i;
      ++kept;
    } else if (wavelen > 64.0) {
      EXPECT_NEAR(ratio, 1.0 / 8, 1e-6) << i;
      ++divided;
    } else {
      EXPECT_GT(ratio, 1.0 / 8);
      EXPECT_LT(ratio, 1.0);
      ++between;
    }
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(between, 0);
}

TEST(RopeTest, ScoresDependOnRelativePositionOnly) {
  RopeConfig rope;
  const RotaryEmbedding emb(rope, 8, torch::kCPU);
  torch::manual_seed(0);
  const torch::Tensor q = torch::randn({1, 1, 1, 8});
  const torch::Tensor k = torch::randn({1, 1, 1, 8});
  auto score = [&](int64_t pq, int64_t pk) {
    auto [cq, sq] = emb.CosSin(torch::tensor({{pq}}), torch::kFloat);
    auto [ck, sk] = emb.CosSin(torch::tensor({{pk}}), torch::kFloat);
    const torch::Tensor rq = RotaryEmbedding::Apply(q, cq, sq);
    EXPECT_NEAR(rq.norm().item<double>(), q.norm().item<double>(), 1e-5);
    return (rq * RotaryEmbedding::Apply(k, ck, sk)).sum().item<double>();
  };
  EXPECT_NEAR(score(5, 2), score(13, 10), 1e-4);
  EXPECT_GT(std::abs(score(5, 2) - score(5, 4)), 1e-4);
}

}  // namespace
}  // namespace lorad::engine
