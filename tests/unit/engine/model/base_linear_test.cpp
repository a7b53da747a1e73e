// BaseLinear: float and NF4 projections compute x W^T + b, and gradients reach the input only.
#include "engine/model/base_linear.h"

#include <gtest/gtest.h>

#include "engine/model/checkpointed_call.h"

namespace lorad::engine {
namespace {

TEST(BaseLinearTest, FloatIsLinearWithBias) {
  torch::manual_seed(0);
  const torch::Tensor w = torch::randn({6, 4});
  const torch::Tensor b = torch::randn({6});
  const torch::Tensor x = torch::randn({2, 3, 4});
  const BaseLinear l = BaseLinear::Float(w, b);
  EXPECT_EQ(l.in_features(), 4);
  EXPECT_EQ(l.out_features(), 6);
  EXPECT_TRUE(torch::allclose(l.Forward(x), torch::matmul(x, w.t()) + b, 1e-5, 1e-5));
}

// The NF4 path's custom backward (re-dequantizing, nothing saved) gives the input gradient of the
// dequantized weight, and the quantized weight gets none.
TEST(BaseLinearTest, Nf4BackwardEqualsTheDequantizedWeights) {
  torch::manual_seed(1);
  auto q = Nf4Tensor::Quantize(torch::randn({64, 128}) * 0.05);
  ASSERT_TRUE(q.ok()) << q.status();
  const torch::Tensor w = q->Dequantize(torch::kFloat);
  const torch::Tensor b = torch::randn({64});
  const BaseLinear l = BaseLinear::Nf4(*q, b);
  EXPECT_TRUE(l.quantized());
  EXPECT_LT(l.bytes(), 64 * 128);  // well under a byte per weight

  const torch::Tensor x0 = torch::randn({3, 5, 128});
  const torch::Tensor g = torch::randn({3, 5, 64});
  torch::Tensor x = x0.clone().requires_grad_(true);
  const torch::Tensor y = l.Forward(x);
  EXPECT_TRUE(torch::allclose(y, torch::matmul(x0, w.t()) + b, 1e-4, 1e-5));
  (y * g).sum().backward();
  torch::Tensor xr = x0.clone().requires_grad_(true);
  ((torch::matmul(xr, w.t()) + b) * g).sum().backward();
  EXPECT_TRUE(torch::allclose(x.grad(), xr.grad(), 1e-4, 1e-5));
  for (const torch::Tensor& t : l.tensors()) EXPECT_FALSE(t.grad().defined());
}

// ForwardGraphOnly computes no product but records Forward's backward: the input gradient equals
// Forward's for float and NF4 weights, and without a gradient to record it is Forward itself.
TEST(BaseLinearTest, GraphOnlyForwardHasForwardsBackward) {
  torch::manual_seed(2);
  auto q = Nf4Tensor::Quantize(torch::randn({64, 128}) * 0.05);
  ASSERT_TRUE(q.ok()) << q.status();
  const std::vector<BaseLinear> linears = {BaseLinear::Float(torch::randn({64, 128})),
                                           BaseLinear::Nf4(*q, torch::randn({64}))};
  const torch::Tensor x0 = torch::randn({3, 5, 128});
  const torch::Tensor g = torch::randn({3, 5, 64});
  for (const BaseLinear& l : linears) {
    torch::Tensor x = x0.clone().requires_grad_(true);
    const torch::Tensor y = l.ForwardGraphOnly(x);
    EXPECT_EQ(y.sizes(), (std::vector<int64_t>{3, 5, 64}));
    EXPECT_EQ(y.scalar_type(), x.scalar_type());
    y.backward(g);
    torch::Tensor xr = x0.clone().requires_grad_(true);
    l.Forward(xr).backward(g);
    EXPECT_TRUE(torch::allclose(x.grad(), xr.grad(), 1e-5, 1e-6)) << "quantized " << l.quantized();
    EXPECT_GT(x.grad().abs().sum().item<double>(), 0);

    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::equal(l.ForwardGraphOnly(x0), l.Forward(x0)));
  }
  EXPECT_THROW(linears[0].ForwardGraphOnly(torch::randn({2, 7}).requires_grad_(true)), c10::Error);
}

// ForwardShared under autograd (one backward node for q, k, v or gate, up): the outputs and the
// input gradient of Forward on each, also inside a checkpointed call (whose recompute keeps the
// dequantized weights for the backward) and with one output not used.
TEST(BaseLinearTest, SharedForwardUnderAutogradHasTheGradientsOfEachForward) {
  torch::manual_seed(3);
  std::vector<BaseLinear> linears;
  for (const int64_t out : {64, 16, 16}) {
    auto q = Nf4Tensor::Quantize(torch::randn({out, 128}) * 0.05);
    ASSERT_TRUE(q.ok()) << q.status();
    linears.push_back(BaseLinear::Nf4(*q, out == 16 ? torch::randn({out}) : torch::Tensor()));
  }
  const std::vector<const BaseLinear*> shared = {&linears[0], &linears[1], &linears[2]};
  const torch::Tensor x0 = torch::randn({3, 5, 128});
  std::vector<torch::Tensor> g;
  for (const BaseLinear& l : linears) g.push_back(torch::randn({3, 5, l.out_features()}));
  // The loss of outputs `used`, from the shared call or one Forward each.
  const auto loss = [&](const std::vector<torch::Tensor>& ys, const std::vector<int>& used) {
    torch::Tensor sum = torch::zeros({});
    for (const int i : used) sum = sum + (ys[i] * g[i]).sum();
    return sum;
  };
  for (const std::vector<int>& used : {std::vector<int>{0, 1, 2}, std::vector<int>{0, 2}}) {
    for (const bool checkpointed : {false, true}) {
      torch::Tensor x = x0.clone().requires_grad_(true);
      torch::Tensor xr = x0.clone().requires_grad_(true);
      std::vector<torch::Tensor> ys, want;
      for (const BaseLinear& l : linears) want.push_back(l.Forward(xr));
      if (checkpointed) {
        // The checkpointed function returns one tensor: the loss's terms as one sum.
        const torch::Tensor out = CheckpointedCall(
            [&](const torch::Tensor& in) {
              return loss(BaseLinear::ForwardShared(shared, in), used);
            },
            x);
        out.backward();
      } else {
        ys = BaseLinear::ForwardShared(shared, x);
        for (size_t i = 0; i < ys.size(); ++i) {
          EXPECT_TRUE(torch::allclose(ys[i], want[i], 1e-5, 1e-6)) << i;
        }
        loss(ys, used).backward();
      }
      loss(want, used).backward();
      EXPECT_TRUE(torch::allclose(x.grad(), xr.grad(), 1e-4, 1e-6))
          << "checkpointed " << checkpointed << ", outputs used " << used.size();
      EXPECT_GT(x.grad().abs().sum().item<double>(), 0);
    }
  }
}

}  // namespace
}  // namespace lorad::engine
