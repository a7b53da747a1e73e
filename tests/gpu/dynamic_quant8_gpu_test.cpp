// The 8-bit dynamic quantization CUDA kernels against the CPU reference
// (kernels/dynamic_quant8.cpp): the same codes and absmax bit for bit, with an offset, NaN, an
// all-zero block and a short last block; dequantize bit for bit. Needs a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/dynamic_quant8.h"
#include "tests/gpu/gpu_buffer.h"

namespace lorad::kernels {
namespace {

using gpu_test::GpuBuffer;

class DynamicQuant8Gpu : public ::testing::TestWithParam<int64_t> {};

TEST_P(DynamicQuant8Gpu, SameCodesAbsmaxAndValuesAsTheCpuReference) {
  const int64_t n = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(n));
  // Absmax-like inputs (positive, skewed) as NF4's double quantization sees them, plus outliers.
  std::lognormal_distribution<float> lognormal(-3.f, 1.f);
  std::vector<float> x(n);
  for (auto& v : x) v = lognormal(rng);
  if (n > 600) {
    for (int64_t i = 256; i < 512; ++i) x[i] = 0.25f;  // all equal the offset below: absmax 0
    x[5] = std::nanf("");
    x[600] = 40.f;
  }
  const float offset = 0.25f;
  const int64_t blocks = (n + 255) / 256;
  std::vector<uint8_t> q(n);
  std::vector<float> absmax(blocks);
  dynamic_quant8_quantize_cpu(x.data(), n, offset, 256, kDynamicMapSigned, q.data(), absmax.data());

  GpuBuffer<float> x_d(x), code(std::vector<float>(kDynamicMapSigned, kDynamicMapSigned + 256));
  GpuBuffer<uint8_t> q_d(n);
  GpuBuffer<float> absmax_d(blocks);
  LORAD_ASSERT_LAUNCH(dynamic_quant8_quantize_cuda(x_d.get(), n, offset, 256, code.get(), q_d.get(),
                                                   absmax_d.get(), nullptr));
  const auto q_gpu = q_d.Read();
  const auto absmax_gpu = absmax_d.Read();
  int64_t bad_q = 0;
  for (int64_t i = 0; i < n; ++i) bad_q += q_gpu[i] != q[i];
  EXPECT_EQ(bad_q, 0);
  EXPECT_EQ(std::memcmp(absmax_gpu.data(), absmax.data(), blocks * 4), 0);

  for (const int blocksize : {256, 64}) {
    const int64_t nb = (n + blocksize - 1) / blocksize;
    std::vector<float> scales(nb);
    for (auto& s : scales) s = lognormal(rng);
    std::vector<float> ref(n);
    dynamic_quant8_dequantize_cpu(q.data(), scales.data(), kDynamicMapSigned, n, blocksize, offset,
                                  ref.data());
    GpuBuffer<float> scales_d(scales), y_d(n);
    LORAD_ASSERT_LAUNCH(dynamic_quant8_dequantize_cuda(q_d.get(), scales_d.get(), code.get(), n,
                                                       blocksize, offset, y_d.get(), nullptr));
    EXPECT_EQ(std::memcmp(y_d.Read().data(), ref.data(), n * 4), 0) << "blocksize " << blocksize;
  }
}

// 262144 is the absmax count of a 4096 x 4096 NF4 weight; 917504 that of 14336 x 4096.
INSTANTIATE_TEST_SUITE_P(Sizes, DynamicQuant8Gpu,
                         ::testing::Values<int64_t>(1, 255, 256, 257, 65539, 262144, 917504,
                                                    4000037));

}  // namespace
}  // namespace lorad::kernels
