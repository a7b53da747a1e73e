// The NF4 CPU reference against the format's definition. Byte-for-byte parity with bitsandbytes
// lives in tests/parity; the CUDA implementation is compared with this reference in tests/gpu.
#include "kernels/nf4.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace lorad::kernels {
namespace {

TEST(Nf4, MidpointsAreTheFp32MeansOfNeighbouringLevels) {
  for (int i = 0; i < 15; ++i) {
    volatile float a = kNf4Code[i], b = kNf4Code[i + 1];  // computed at run time, not folded
    EXPECT_EQ(kNf4Midpoints.v[i], 0.5f * (a + b)) << i;
  }
}

TEST(Nf4, NearestIndexPicksTheClosestLevel) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  for (int i = 0; i < 10000; ++i) {
    const float x = uni(rng);
    const uint8_t got = nf4_nearest_index(x);
    for (int j = 0; j < 16; ++j) {
      EXPECT_LE(std::fabs(kNf4Code[got] - x), std::fabs(kNf4Code[j] - x)) << "x=" << x;
    }
  }
}

TEST(Nf4, TiesAtAMidpointGoToTheLowerLevel) {
  for (int i = 0; i < 15; ++i) EXPECT_EQ(nf4_nearest_index(kNf4Midpoints.v[i]), i);
  EXPECT_EQ(nf4_nearest_index(std::nanf("")), 0);
}

TEST(Nf4, LevelsRoundTripExactlyAndPackHighNibbleFirst) {
  // A block holding each level (times an absmax of 2) in order, repeated.
  std::vector<float> w(kNf4BlockSize);
  for (int i = 0; i < kNf4BlockSize; ++i) w[i] = 2.f * kNf4Code[i % 16];
  std::vector<uint8_t> packed(kNf4BlockSize / 2);
  std::vector<float> absmax(1);
  nf4_quantize_cpu(w.data(), kNf4BlockSize, packed.data(), absmax.data());
  EXPECT_FLOAT_EQ(absmax[0], 2.f);
  EXPECT_EQ(packed[0], 0x01);  // levels 0 and 1: first element in the high nibble
  EXPECT_EQ(packed[7], 0xEF);  // levels 14 and 15
  std::vector<float> back(kNf4BlockSize);
  nf4_dequantize_cpu(packed.data(), absmax.data(), kNf4BlockSize, back.data());
  for (int i = 0; i < kNf4BlockSize; ++i) EXPECT_FLOAT_EQ(back[i], w[i]);
}

TEST(Nf4, ErrorIsBoundedByHalfTheWidestGap) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.f, 0.02f);
  const int64_t n = 64 * 32;
  std::vector<float> w(n), back(n), absmax(n / kNf4BlockSize);
  std::vector<uint8_t> packed(n / 2);
  for (auto& v : w) v = normal(rng);
  nf4_quantize_cpu(w.data(), n, packed.data(), absmax.data());
  nf4_dequantize_cpu(packed.data(), absmax.data(), n, back.data());
  float widest_gap = 0.f;
  for (int j = 0; j < 15; ++j) widest_gap = std::max(widest_gap, kNf4Code[j + 1] - kNf4Code[j]);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_LE(std::fabs(back[i] - w[i]), 0.5f * widest_gap * absmax[i / kNf4BlockSize] + 1e-7f);
  }
}

TEST(Nf4, AllZeroBlockStaysZero) {
  std::vector<float> w(kNf4BlockSize, 0.f), back(kNf4BlockSize, 1.f), absmax(1);
  std::vector<uint8_t> packed(kNf4BlockSize / 2);
  nf4_quantize_cpu(w.data(), kNf4BlockSize, packed.data(), absmax.data());
  EXPECT_EQ(absmax[0], 0.f);
  EXPECT_EQ(packed[0], kNf4ZeroIndex << 4 | kNf4ZeroIndex);
  nf4_dequantize_cpu(packed.data(), absmax.data(), kNf4BlockSize, back.data());
  for (float v : back) EXPECT_EQ(v, 0.f);
}

TEST(Nf4, ShortLastBlockAndOddCountArePaddedWithTheZeroLevel) {
  // 64 + 5 values: two blocks, the second of 5; 35 bytes, the last low nibble is padding.
  const int64_t n = 69;
  std::vector<float> w(n);
  for (int64_t i = 0; i < 64; ++i) w[i] = static_cast<float>(i % 7) - 3.f;
  const float tail[5] = {1.f, 2.f, 3.f, -3.f, -2.f};
  std::copy(tail, tail + 5, w.begin() + 64);
  std::vector<uint8_t> packed(Nf4PackedBytes(n));
  std::vector<float> absmax(Nf4Blocks(n));
  ASSERT_EQ(packed.size(), 35u);
  ASSERT_EQ(absmax.size(), 2u);
  nf4_quantize_cpu(w.data(), n, packed.data(), absmax.data());
  EXPECT_EQ(absmax[1], 3.f);  // max |w| over elements 64..68 = {1, 2, 3, -3, -2}
  EXPECT_EQ(packed[34] & 0x0F, kNf4ZeroIndex);
  std::vector<float> back(n);
  nf4_dequantize_cpu(packed.data(), absmax.data(), n, back.data());
  // -3 and 3 are the block's extremes: exactly the levels -1 and 1 times absmax.
  EXPECT_EQ(back[66], 3.f);
  EXPECT_EQ(back[67], -3.f);
}

}  // namespace
}  // namespace lorad::kernels
