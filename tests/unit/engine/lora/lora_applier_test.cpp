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
  // Apply owns the y it is given (it adds in place), so each call gets its own copy.
  EXPECT_TRUE(torch::allclose(applier.Apply(1, Projection::kDown, x, y.clone()), want, 1e-5, 1e-5));
  EXPECT_TRUE(
      torch::allclose(applier.Apply(1, Projection::kDown, x.view({10, 6}), y.clone().view({10, 3})),
                      want.view({10, 3}), 1e-5, 1e-5));
  // A y that is not contiguous (a column slice) gets a new tensor and is left as it was.
  const torch::Tensor wide = torch::randn({2, 5, 7});
  const torch::Tensor slice = wide.narrow(2, 2, 3);
  const torch::Tensor before = slice.clone();
  EXPECT_TRUE(torch::allclose(applier.Apply(1, Projection::kDown, x, slice), before + (want - y),
                              1e-5, 1e-5));
  EXPECT_TRUE(torch::equal(slice, before));
  EXPECT_TRUE(torch::equal(applier.Apply(0, Projection::kDown, x, y.clone()), y));
  EXPECT_TRUE(
      torch::equal(applier.Apply(1, Projection::kUp, torch::randn({2, 5, 4}), y.clone()), y));
}

TEST(LoraApplierTest, DropoutOnlyWhenTraining) {
  LoraAdapter adapter = OneLayerAdapter();
  adapter.config.dropout = 0.5;
  const torch::Tensor x = torch::randn({4, 6});
  const torch::Tensor y = torch::zeros({4, 3});
  const SingleLoraApplier eval(adapter, 2, false);
  EXPECT_TRUE(torch::equal(eval.Apply(1, Projection::kDown, x, y.clone()),
                           eval.Apply(1, Projection::kDown, x, y.clone())));
  const SingleLoraApplier train(adapter, 2, true);
  EXPECT_FALSE(torch::equal(train.Apply(1, Projection::kDown, x, y.clone()),
                            eval.Apply(1, Projection::kDown, x, y.clone())));
}

TEST(LoraApplierTest, GradientsReachTheAdapter) {
  LoraAdapter adapter = OneLayerAdapter();
  LoraPair& p = adapter.layers.at("model.layers.1.mlp.down_proj");
  p.a.requires_grad_(true);
  p.b.requires_grad_(true);
  const SingleLoraApplier applier(adapter, 2, true);
  // Through the in-place sum, to the adapter and to the base output y (the input of a frozen
  // base projection upstream still needs its gradient).
  const torch::Tensor x = torch::randn({3, 6}).requires_grad_(true);
  const torch::Tensor y = (torch::randn({3, 3}).requires_grad_(true) * 1.0);
  torch::Tensor out = applier.Apply(1, Projection::kDown, x, y);
  const torch::Tensor weights = torch::randn({3, 3});
  (out * weights).sum().backward();
  EXPECT_TRUE(p.a.grad().defined());
  EXPECT_TRUE(p.b.grad().defined());
  EXPECT_GT(p.b.grad().abs().sum().item<double>(), 0);
  // dL/dx = (weights B) A * scaling, as the update is scaling * x A^T B^T.
  const torch::Tensor want_dx =
      4.0 * torch::matmul(torch::matmul(weights, p.b.detach()), p.a.detach());
  EXPECT_TRUE(torch::allclose(x.grad(), want_dx, 1e-5, 1e-5));
}

}  // namespace
}  // namespace lorad::engine

namespace lorad::engine {
namespace {

// `tensors` followed by every pair's A and B gradients, in the adapter's order.
std::vector<torch::Tensor> WithAdapterGradients(const LoraAdapter& adapter,
                                                std::vector<torch::Tensor> tensors) {
  for (const auto& [path, pair] : adapter.layers) {
    tensors.push_back(pair.a.grad().clone());
    tensors.push_back(pair.b.grad().clone());
  }
  return tensors;
}

// ApplyShared stacks the A matrices of projections that share x (q, k, v with ranks 2, 3, 2):
// outputs and the gradients of x, every A and every B equal Apply on each projection in turn, for
// [B, T, in] and [N, in] inputs; an untargeted projection in the group falls back to Apply.
TEST(LoraApplierTest, SharedProjectionsEqualOneApplyEach) {
  LoraAdapter adapter;
  adapter.config.r = 2;
  adapter.config.alpha = 8;
  torch::manual_seed(4);
  const std::vector<std::pair<Projection, int64_t>> group = {
      {Projection::kQ, 5}, {Projection::kK, 3}, {Projection::kV, 3}};
  int64_t rank = 2;
  for (const auto& [p, out] : group) {
    adapter.layers[ProjectionPath(0, p)] = {torch::randn({rank, 6}).requires_grad_(true),
                                            torch::randn({out, rank}).requires_grad_(true)};
    rank = rank == 2 ? 3 : 2;
  }
  const SingleLoraApplier applier(adapter, 1, /*train=*/true);
  const std::vector<Projection> projections = {Projection::kQ, Projection::kK, Projection::kV};
  for (const std::vector<int64_t>& lead : {std::vector<int64_t>{2, 4}, std::vector<int64_t>{8}}) {
    auto run = [&](bool shared) {
      for (auto& [path, pair] : adapter.layers) {
        pair.a.mutable_grad().reset();
        pair.b.mutable_grad().reset();
      }
      torch::manual_seed(9);
      std::vector<int64_t> x_shape = lead;
      x_shape.push_back(6);
      torch::Tensor x = torch::randn(x_shape).requires_grad_(true);
      std::vector<torch::Tensor> ys;
      for (const auto& [p, out] : group) {
        std::vector<int64_t> y_shape = lead;
        y_shape.push_back(out);
        ys.push_back(torch::randn(y_shape));
      }
      std::vector<torch::Tensor> outs;
      if (shared) {
        outs = applier.ApplyShared(0, projections, x, ys);
      } else {
        for (size_t i = 0; i < ys.size(); ++i) {
          outs.push_back(applier.Apply(0, projections[i], x, ys[i]));
        }
      }
      torch::Tensor loss = torch::zeros({});
      for (const torch::Tensor& o : outs) loss = loss + (o * o).sum();
      loss.backward();
      std::vector<torch::Tensor> result = outs;
      result.push_back(x.grad());
      return WithAdapterGradients(adapter, std::move(result));
    };
    const auto one_each = run(false);
    const auto shared = run(true);
    ASSERT_EQ(one_each.size(), shared.size());
    for (size_t i = 0; i < one_each.size(); ++i) {
      EXPECT_TRUE(torch::allclose(shared[i].detach(), one_each[i].detach(), 1e-5, 1e-5))
          << "tensor " << i << " of lead " << lead.size();
    }
  }
  // k_proj untargeted: the group falls back to one Apply each, and k's y is left as it was.
  adapter.layers.erase(ProjectionPath(0, Projection::kK));
  const SingleLoraApplier partial(adapter, 1, /*train=*/false);
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({3, 6});
  const std::vector<torch::Tensor> ys = {torch::randn({3, 5}), torch::randn({3, 3}),
                                         torch::randn({3, 3})};
  const torch::Tensor k_before = ys[1].clone();
  const auto outs = partial.ApplyShared(0, projections, x, {ys[0].clone(), ys[1], ys[2].clone()});
  EXPECT_TRUE(torch::equal(outs[1], k_before));
  EXPECT_TRUE(
      torch::allclose(outs[0], partial.Apply(0, Projection::kQ, x, ys[0].clone()), 1e-6, 1e-6));
}

// ApplySharedGraphOnly (a recompute whose values the caller replaces) computes no update: its
// outputs keep the base values, and for the same upstream gradients x, every A and every B get
// exactly ApplyShared's gradients, for [B, T, in] and [N, in] inputs (3-D and 2-D update GEMMs),
// with a scaling of 4.
TEST(LoraApplierTest, GraphOnlyUpdatesGiveTheComputedUpdatesGradients) {
  LoraAdapter adapter;
  adapter.config.r = 2;
  adapter.config.alpha = 8;
  torch::manual_seed(5);
  const std::vector<Projection> projections = {Projection::kGate, Projection::kUp};
  for (const Projection p : projections) {
    adapter.layers[ProjectionPath(0, p)] = {torch::randn({2, 6}).requires_grad_(true),
                                            torch::randn({7, 2}).requires_grad_(true)};
  }
  const SingleLoraApplier applier(adapter, 1, /*train=*/true);
  for (const std::vector<int64_t>& lead : {std::vector<int64_t>{2, 4}, std::vector<int64_t>{8}}) {
    std::vector<int64_t> x_shape = lead;
    x_shape.push_back(6);
    std::vector<int64_t> y_shape = lead;
    y_shape.push_back(7);
    const torch::Tensor x0 = torch::randn(x_shape);
    const std::vector<torch::Tensor> ys0 = {torch::randn(y_shape), torch::randn(y_shape)};
    const std::vector<torch::Tensor> upstream = {torch::randn(y_shape), torch::randn(y_shape)};
    auto run = [&](bool graph_only) {
      for (auto& [path, pair] : adapter.layers) {
        pair.a.mutable_grad().reset();
        pair.b.mutable_grad().reset();
      }
      const torch::Tensor x = x0.clone().requires_grad_(true);
      // The base outputs as a graph tensor (their gradient reaches x), as a recompute's are.
      std::vector<torch::Tensor> ys;
      for (const torch::Tensor& y : ys0) ys.push_back(y + 0 * x.sum());
      const std::vector<torch::Tensor> outs =
          graph_only ? applier.ApplySharedGraphOnly(0, projections, x, ys)
                     : applier.ApplyShared(0, projections, x, ys);
      torch::autograd::backward(outs, upstream);
      return WithAdapterGradients(adapter,
                                  {outs[0].detach().clone(), outs[1].detach().clone(), x.grad()});
    };
    const auto computed = run(false);
    const auto graph = run(true);
    EXPECT_TRUE(torch::equal(graph[0], ys0[0]));  // no update added
    EXPECT_TRUE(torch::equal(graph[1], ys0[1]));
    EXPECT_FALSE(torch::allclose(computed[0], ys0[0]));
    for (size_t i = 2; i < computed.size(); ++i) {
      EXPECT_TRUE(torch::equal(graph[i], computed[i]))
          << "gradient " << i << " of lead " << lead.size();
    }
  }
}

}  // namespace
}  // namespace lorad::engine
