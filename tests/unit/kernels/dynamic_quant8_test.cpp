// The 8-bit dynamic (double-quantization) CPU reference against its definition. Parity with
// bitsandbytes' own bytes is in tests/parity/nf4_parity_test.cpp.
#include "kernels/dynamic_quant8.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace lorad::kernels {
namespace {

TEST(DynamicQuant8, SignedMapIsSortedSpansMinusOneToOneAndHoldsZero) {
  EXPECT_TRUE(std::is_sorted(kDynamicMapSigned, kDynamicMapSigned + 256));
  EXPECT_GT(kDynamicMapSigned[0], -1.f);  // bitsandbytes' signed map starts at -0.99297
  EXPECT_EQ(kDynamicMapSigned[255], 1.f);
  EXPECT_EQ(std::count(kDynamicMapSigned, kDynamicMapSigned + 256, 0.f), 1);
  EXPECT_EQ(std::adjacent_find(kDynamicMapSigned, kDynamicMapSigned + 256),
            kDynamicMapSigned + 256);  // no duplicates
}

TEST(DynamicQuant8, LookupTableIsMonotoneAndCoversEveryReachableCode) {
  std::vector<uint8_t> lut(kDynamicQuant8Bins);
  dynamic_quant8_build_lut(kDynamicMapSigned, lut.data());
  EXPECT_TRUE(std::is_sorted(lut.begin(), lut.end()));
  EXPECT_EQ(lut.front(), 0);
  EXPECT_EQ(lut.back(), 255);
}

// Each value lands on a code no farther from it than the nearest code plus one bin width: the
// 65536-bin lookup is coarser than the code book only near zero.
TEST(DynamicQuant8, QuantizedValueIsWithinOneBinOfTheNearestCode) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t n = 256 * 8 + 77;  // a short last block
  std::vector<float> x(n);
  for (auto& v : x) v = normal(rng);
  const float offset = 0.25f;
  std::vector<uint8_t> q(n);
  std::vector<float> absmax((n + 255) / 256), y(n);
  dynamic_quant8_quantize_cpu(x.data(), n, offset, 256, kDynamicMapSigned, q.data(), absmax.data());
  dynamic_quant8_dequantize_cpu(q.data(), absmax.data(), kDynamicMapSigned, n, 256, offset,
                                y.data());
  const float bin = 2.f / 65535.f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = absmax[i / 256];
    const float s = (x[i] - offset) / a;
    float nearest = 10.f;
    for (float c : kDynamicMapSigned) nearest = std::min(nearest, std::fabs(c - s));
    EXPECT_LE(std::fabs(kDynamicMapSigned[q[i]] - s), nearest + bin) << i;
    EXPECT_NEAR(y[i], x[i], (nearest + bin) * a + 1e-6f) << i;
  }
}

TEST(DynamicQuant8, BlockMaximaRoundTripExactly) {
  // The element holding a block's absmax scales to exactly +-1, which the code book holds only
  // for +1 (the signed map's low end is -0.99297).
  std::vector<float> x = {0.5f, -0.25f, 2.0f, 0.f};
  std::vector<uint8_t> q(4);
  std::vector<float> absmax(1), y(4);
  dynamic_quant8_quantize_cpu(x.data(), 4, 0.f, 256, kDynamicMapSigned, q.data(), absmax.data());
  EXPECT_EQ(absmax[0], 2.f);
  EXPECT_EQ(q[2], 255);
  dynamic_quant8_dequantize_cpu(q.data(), absmax.data(), kDynamicMapSigned, 4, 256, 0.f, y.data());
  EXPECT_EQ(y[2], 2.f);
}

TEST(DynamicQuant8, ConstantBlockStoresZeroCodesAndDequantizesToTheOffset) {
  std::vector<float> x(300, 1.5f);
  std::vector<uint8_t> q(300, 99);
  std::vector<float> absmax(2), y(300);
  dynamic_quant8_quantize_cpu(x.data(), 300, 1.5f, 256, kDynamicMapSigned, q.data(), absmax.data());
  EXPECT_EQ(absmax[0], 0.f);
  EXPECT_EQ(absmax[1], 0.f);
  EXPECT_TRUE(std::all_of(q.begin(), q.end(), [](uint8_t v) { return v == 0; }));
  dynamic_quant8_dequantize_cpu(q.data(), absmax.data(), kDynamicMapSigned, 300, 256, 1.5f,
                                y.data());
  EXPECT_TRUE(std::all_of(y.begin(), y.end(), [](float v) { return v == 1.5f; }));
}

TEST(DynamicQuant8, NanIsIgnoredForTheScaleAndStoredAsTheLowestCode) {
  std::vector<float> x = {1.f, std::nanf(""), -0.5f};
  std::vector<uint8_t> q(3);
  std::vector<float> absmax(1);
  dynamic_quant8_quantize_cpu(x.data(), 3, 0.f, 256, kDynamicMapSigned, q.data(), absmax.data());
  EXPECT_EQ(absmax[0], 1.f);
  EXPECT_EQ(q[1], 0);
}

}  // namespace
}  // namespace lorad::kernels
