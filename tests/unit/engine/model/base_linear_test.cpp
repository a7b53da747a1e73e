// BaseLinear: float and NF4 projections compute x W^T + b, and gradients reach the input only.
#include "engine/model/base_linear.h"

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace lorad::engine

namespace lorad::engine {
namespace {

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

}  // namespace
}  // namespace lorad::engine
