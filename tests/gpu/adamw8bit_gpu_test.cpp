// The 8-bit AdamW CUDA kernel against the CPU reference (kernels/adamw8bit.cpp): after each of
// several steps from a fresh state, the parameters, both moments' codes and both scales are equal
// bit for bit, with non-finite gradients mixed in. Needs a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/adamw8bit.h"
#include "kernels/dynamic_quant8.h"
#include "tests/gpu/gpu_buffer.h"

namespace lorad::kernels {
namespace {

using gpu_test::GpuBuffer;

class AdamW8bitGpu : public ::testing::TestWithParam<int64_t> {};

TEST_P(AdamW8bitGpu, EveryStepEqualsTheCpuReference) {
  const int64_t n = GetParam();
  const int64_t blocks = (n + kAdamW8bitBlockSize - 1) / kAdamW8bitBlockSize;
  std::mt19937 rng(static_cast<uint32_t>(n));
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> param(n), grad(n);
  for (auto& p : param) p = 0.02f * normal(rng);
  std::vector<uint8_t> q1(n, 0), q2(n, 0);  // bitsandbytes' fresh state
  std::vector<float> absmax1(blocks, 0.f), absmax2(blocks, 0.f);

  GpuBuffer<float> param_d(param), grad_d(n), absmax1_d(absmax1), absmax2_d(absmax2);
  GpuBuffer<uint8_t> q1_d(q1), q2_d(q2);
  GpuBuffer<float> code1(std::vector<float>(kDynamicMapSigned, kDynamicMapSigned + 256));
  GpuBuffer<float> code2(std::vector<float>(kDynamicMapUnsigned, kDynamicMapUnsigned + 256));
  for (int64_t step = 1; step <= 3; ++step) {
    // Gradients of varied scale per block (so the block scales differ), a few non-finite.
    for (int64_t i = 0; i < n; ++i)
      grad[i] = std::ldexp(normal(rng), -static_cast<int>(i / 256 % 12));
    if (n > 1000) {
      grad[17] = std::numeric_limits<float>::quiet_NaN();
      grad[300] = std::numeric_limits<float>::infinity();
      grad[n - 1] = -std::numeric_limits<float>::infinity();
    }
    grad_d.Write(grad);
    const AdamW8bitScalars s = adamw8bit_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, step);
    adamw8bit_step_cpu(param.data(), grad.data(), q1.data(), q2.data(), absmax1.data(),
                       absmax2.data(), kDynamicMapSigned, kDynamicMapUnsigned, n, s);
    LORAD_ASSERT_LAUNCH(adamw8bit_step_cuda(param_d.get(), grad_d.get(), q1_d.get(), q2_d.get(),
                                            absmax1_d.get(), absmax2_d.get(), code1.get(),
                                            code2.get(), n, s, nullptr));
    const auto p_gpu = param_d.Read();
    const auto q1_gpu = q1_d.Read(), q2_gpu = q2_d.Read();
    int64_t bad_p = 0, bad_q1 = 0, bad_q2 = 0;
    for (int64_t i = 0; i < n; ++i) {
      bad_p += std::memcmp(&p_gpu[i], &param[i], 4) != 0;
      bad_q1 += q1_gpu[i] != q1[i];
      bad_q2 += q2_gpu[i] != q2[i];
    }
    EXPECT_EQ(bad_p, 0) << "step " << step;
    EXPECT_EQ(bad_q1, 0) << "step " << step;
    EXPECT_EQ(bad_q2, 0) << "step " << step;
    EXPECT_EQ(std::memcmp(absmax1_d.Read().data(), absmax1.data(), blocks * 4), 0) << step;
    EXPECT_EQ(std::memcmp(absmax2_d.Read().data(), absmax2.data(), blocks * 4), 0) << step;
    // Keep going from the CPU's state either way, so one mismatch does not cascade.
    param_d.Write(param);
    q1_d.Write(q1);
    q2_d.Write(q2);
    absmax1_d.Write(absmax1);
    absmax2_d.Write(absmax2);
  }
}

// A LoRA A matrix (16 x 4096), odd sizes with a short last block, and a 4096 x 4096 parameter.
INSTANTIATE_TEST_SUITE_P(Sizes, AdamW8bitGpu,
                         ::testing::Values<int64_t>(1, 255, 256, 16 * 4096, 1000003, 4096 * 4096));

}  // namespace
}  // namespace lorad::kernels
