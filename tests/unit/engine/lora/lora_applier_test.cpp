// SingleLoraApplier: y + scaling * B A x on targeted projections, y untouched elsewhere, dropout
// only in training, gradients into A and B.
#include "engine/lora/lora_applier.h"

#include <gtest/gtest.h>

namespace lorad::engine {
namespace {

LoraAdapter OneLayerAdapter() {
  LoraAdapter adapter;
  adapter.config.r = 2;
  adapter.config.alpha = 8;  // scaling 4
  torch::manual_seed(0);
  adapter.layers["model.layers.1.mlp.down_proj"] = {torch::randn({2, 6}), torch::randn({3, 2})};
  return adapter;
}

TEST(LoraApplierTest, ProjectionPathsArePeftModulePaths) {
  EXPECT_EQ(ProjectionPath(0, Projection::kQ), "model.layers.0.self_attn.q_proj");
  EXPECT_EQ(ProjectionPath(3, Projection::kO), "model.layers.3.self_attn.o_proj");
  EXPECT_EQ(ProjectionPath(1, Projection::kDown), "model.layers.1.mlp.down_proj");
  EXPECT_STREQ(ProjectionName(Projection::kGate), "gate_proj");
}

TEST(LoraApplierTest, AddsScaledLowRankUpdateOnTargetsOnly) {
  const LoraAdapter adapter = OneLayerAdapter();
  const SingleLoraApplier applier(adapter, 2, /*train=*/false);
  const torch::Tensor x = torch::randn({2, 5, 6});
  const torch::Tensor y = torch::randn({2, 5, 3});
  const LoraPair& p = adapter.layers.at("model.layers.1.mlp.down_proj");
  const torch::Tensor want = y + 4.0 * torch::matmul(torch::matmul(x, p.a.t()), p.b.t());
  EXPECT_TRUE(torch::allclose(applier.Apply(1, Projection::kDown, x, y), want, 1e-5, 1e-5));
  EXPECT_TRUE(torch::equal(applier.Apply(0, Projection::kDown, x, y), y));
  EXPECT_TRUE(torch::equal(applier.Apply(1, Projection::kUp, torch::randn({2, 5, 4}), y), y));
}

TEST(LoraApplierTest, DropoutOnlyWhenTraining) {
  LoraAdapter adapter = OneLayerAdapter();
  adapter.config.dropout = 0.5;
  const torch::Tensor x = torch::randn({4, 6});
  const torch::Tensor y = torch::zeros({4, 3});
  const SingleLoraApplier eval(adapter, 2, false);
  EXPECT_TRUE(
      torch::equal(eval.Apply(1, Projection::kDown, x, y), eval.Apply(1, Projection::kDown, x, y)));
  const SingleLoraApplier train(adapter, 2, true);
  EXPECT_FALSE(torch::equal(train.Apply(1, Projection::kDown, x, y),
                            eval.Apply(1, Projection::kDown, x, y)));
}

TEST(LoraApplierTest, GradientsReachTheAdapter) {
  LoraAdapter adapter = OneLayerAdapter();
  LoraPair& p = adapter.layers.at("model.layers.1.mlp.down_proj");
  p.a.requires_grad_(true);
  p.b.requires_grad_(true);
  const SingleLoraApplier applier(adapter, 2, true);
  applier.Apply(1, Projection::kDown, torch::randn({3, 6}), torch::zeros({3, 3})).sum().backward();
  EXPECT_TRUE(p.a.grad().defined());
  EXPECT_TRUE(p.b.grad().defined());
  EXPECT_GT(p.b.grad().abs().sum().item<double>(), 0);
}

}  // namespace
}  // namespace lorad::engine
