// The 4-bit GEMV CPU reference against a double-precision product with the dequantized weight.
#include "kernels/nf4_gemv.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/nf4.h"

namespace lorad::kernels {
namespace {

TEST(Nf4Gemv, EqualsTheProductWithTheDequantizedWeight) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (const auto& [out, in] : {std::pair<int64_t, int64_t>{48, 192}, {5, 67}, {1, 64}}) {
    std::vector<float> w(out * in);
    for (auto& v : w) v = 0.02f * normal(rng);
    std::vector<uint8_t> packed(Nf4PackedBytes(out * in));
    std::vector<float> absmax(Nf4Blocks(out * in)), dq(out * in);
    nf4_quantize_cpu(w.data(), out * in, packed.data(), absmax.data());
    nf4_dequantize_cpu(packed.data(), absmax.data(), out * in, dq.data());
    for (int64_t rows = 1; rows <= kNf4GemvMaxRows; ++rows) {
      std::vector<float> x(rows * in), y(rows * out, -1.f);
      for (auto& v : x) v = normal(rng);
      nf4_gemv_cpu(x.data(), rows, packed.data(), absmax.data(), out, in, y.data());
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t o = 0; o < out; ++o) {
          double ref = 0, mag = 0;
          for (int64_t k = 0; k < in; ++k) {
            ref += static_cast<double>(x[r * in + k]) * dq[o * in + k];
            mag += std::fabs(static_cast<double>(x[r * in + k]) * dq[o * in + k]);
          }
          EXPECT_NEAR(y[r * out + o], ref, 2e-5 * mag + 1e-12)
              << "out " << out << " in " << in << " row " << r << " o " << o;
        }
      }
    }
  }
}

}  // namespace
}  // namespace lorad::kernels
