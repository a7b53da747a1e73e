// The cross-entropy reference against the formulas written out in double precision: the loss of
// each row and the gradient softmax - onehot, for fp32 and bf16 logits, with ignored rows.
#include "kernels/cross_entropy.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/bfloat16.h"

namespace lorad::kernels {
namespace {

TEST(CrossEntropyTest, LossAndGradientAreSoftmaxMinusOnehot) {
  const int64_t rows = 4, vocab = 37;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.f, 3.f);
  std::vector<float> x(rows * vocab);
  for (float& v : x) v = normal(rng);
  const std::vector<int64_t> targets = {3, -1, 36, 0};  // row 1 ignored
  std::vector<float> loss(rows), grad(x.size());
  cross_entropy_rows_cpu(x.data(), FloatKind::kF32, targets.data(), rows, vocab, loss.data(),
                         grad.data());
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] < 0) {
      EXPECT_EQ(loss[r], 0.0f);
      for (int64_t j = 0; j < vocab; ++j) EXPECT_EQ(grad[r * vocab + j], 0.0f);
      continue;
    }
    double sum = 0;
    for (int64_t j = 0; j < vocab; ++j) sum += std::exp(double(x[r * vocab + j]));
    const double lse = std::log(sum);
    EXPECT_NEAR(loss[r], lse - x[r * vocab + targets[r]], 1e-5 * std::fabs(lse) + 1e-6);
    for (int64_t j = 0; j < vocab; ++j) {
      const double p = std::exp(double(x[r * vocab + j]) - lse) - (j == targets[r] ? 1 : 0);
      EXPECT_NEAR(grad[r * vocab + j], p, 1e-6) << "row " << r << " column " << j;
    }
  }
}

TEST(CrossEntropyTest, Bf16GradientIsTheFp32OneRounded) {
  const int64_t rows = 2, vocab = 20;
  std::vector<uint16_t> x(rows * vocab);
  std::vector<float> xf(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = float_to_bf16(std::sin(float(i)) * 4.0f);
    xf[i] = bf16_to_float(x[i]);
  }
  const std::vector<int64_t> targets = {7, 19};
  std::vector<float> loss(rows), loss_f(rows), grad_f(x.size());
  std::vector<uint16_t> grad(x.size());
  cross_entropy_rows_cpu(x.data(), FloatKind::kBF16, targets.data(), rows, vocab, loss.data(),
                         grad.data());
  cross_entropy_rows_cpu(xf.data(), FloatKind::kF32, targets.data(), rows, vocab, loss_f.data(),
                         grad_f.data());
  EXPECT_EQ(loss, loss_f);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(grad[i], float_to_bf16(grad_f[i])) << i;
  // The loss alone: no gradient buffer.
  std::vector<float> loss_only(rows);
  cross_entropy_rows_cpu(x.data(), FloatKind::kBF16, targets.data(), rows, vocab, loss_only.data(),
                         nullptr);
  EXPECT_EQ(loss_only, loss);
}

}  // namespace
}  // namespace lorad::kernels
