// The cross-entropy kernel against its CPU reference (kernels/cross_entropy.cpp): fp32 and bf16
// logits, Llama 3's vocabulary of 128256 and odd sizes (the scalar tail), ignored rows, and the
// loss alone. Needs a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/cross_entropy.h"
#include "tests/gpu/float_values.h"
#include "tests/gpu/gpu_buffer.h"

namespace lorad::kernels {
namespace {

using gpu_test::GpuBuffer;
using gpu_test::RandomValues;
using gpu_test::ValueAt;

class CrossEntropyGpuTest : public ::testing::TestWithParam<FloatKind> {};

TEST_P(CrossEntropyGpuTest, LossAndGradientEqualTheReference) {
  const FloatKind kind = GetParam();
  for (const auto& [rows, vocab] : {std::pair<int64_t, int64_t>{6, 128256}, {5, 1001}, {3, 7}}) {
    const auto x = RandomValues(rows * vocab, kind, 21, 4.0f);
    std::vector<int64_t> targets(rows);
    for (int64_t r = 0; r < rows; ++r) targets[r] = (r * 7919) % vocab;
    targets[1] = -1;  // ignored
    std::vector<float> want_loss(rows);
    std::vector<char> want_grad(x.size());
    cross_entropy_rows_cpu(x.data(), kind, targets.data(), rows, vocab, want_loss.data(),
                           want_grad.data());
    GpuBuffer<char> x_dev(x), grad_dev(x.size());
    GpuBuffer<int64_t> t_dev(targets);
    GpuBuffer<float> loss_dev(rows);
    LORAD_ASSERT_LAUNCH(cross_entropy_rows_cuda(x_dev.get(), kind, t_dev.get(), rows, vocab,
                                                loss_dev.get(), grad_dev.get(), nullptr));
    const std::vector<float> loss = loss_dev.Read();
    const std::vector<char> grad = grad_dev.Read();
    // The sum of exponentials is reduced in another order (the host's in double): a few fp32
    // units of the log-sum-exp, and a bf16 unit where that tips a rounding.
    for (int64_t r = 0; r < rows; ++r) {
      ASSERT_NEAR(loss[r], want_loss[r], 1e-4 * std::fabs(want_loss[r]) + 1e-5) << "row " << r;
    }
    const float unit = kind == FloatKind::kF32 ? 3e-5f : 1.0f / 128;
    for (size_t i = 0; i < x.size() / FloatKindSize(kind); ++i) {
      const float w = ValueAt(want_grad, kind, i), g = ValueAt(grad, kind, i);
      ASSERT_NEAR(g, w, unit * std::fabs(w) + 1e-7f) << "element " << i;
    }
    GpuBuffer<float> loss_only(rows);
    LORAD_ASSERT_LAUNCH(cross_entropy_rows_cuda(x_dev.get(), kind, t_dev.get(), rows, vocab,
                                                loss_only.get(), nullptr, nullptr));
    EXPECT_EQ(loss_only.Read(), loss);
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, CrossEntropyGpuTest,
                         ::testing::Values(FloatKind::kF32, FloatKind::kBF16));

}  // namespace
}  // namespace lorad::kernels
