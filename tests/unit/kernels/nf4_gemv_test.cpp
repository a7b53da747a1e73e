// The 4-bit GEMV CPU reference against a double-precision product with the dequantized weight,
// and the tensor-core kernel's reference (kernels/nf4_mma.h) against the same product with the
// levels rounded to bf16 / fp16.
#include "kernels/nf4_gemv.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/bfloat16.h"
#include "kernels/nf4.h"
#include "kernels/nf4_mma.h"

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

TEST(Nf4Mma, EqualsTheProductWithTheLevelsRoundedToTheActivationType) {
  std::mt19937 rng(8);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t out = 40, in = 512, rows = 3;
  std::vector<float> w(out * in), x(rows * in);
  for (auto& v : w) v = 0.02f * normal(rng);
  for (auto& v : x) v = bf16_to_float(float_to_bf16(normal(rng)));
  std::vector<uint8_t> packed(Nf4PackedBytes(out * in));
  std::vector<float> absmax(Nf4Blocks(out * in));
  nf4_quantize_cpu(w.data(), out * in, packed.data(), absmax.data());
  for (const FloatKind kind : {FloatKind::kBF16, FloatKind::kF16}) {
    float code[16];
    nf4_code_rounded_to(kind, code);
    int64_t differs = 0;
    for (int i = 0; i < 16; ++i) {
      // Rounded, not truncated: within half a unit (2^-8 bf16, 2^-11 fp16, relative).
      const double half_unit =
          kind == FloatKind::kBF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
      EXPECT_LE(std::fabs(double(code[i]) - kNf4Code[i]), half_unit * std::fabs(kNf4Code[i]));
      differs += code[i] != kNf4Code[i];
    }
    EXPECT_GT(differs, 0) << "the levels are not all representable: rounding must show";
    std::vector<float> y(rows * out);
    nf4_mma_cpu(x.data(), rows, packed.data(), absmax.data(), out, in, kind, y.data());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t o = 0; o < out; ++o) {
        double ref = 0, mag = 0;
        for (int64_t k = 0; k < in; ++k) {
          const int64_t i = o * in + k;
          const uint8_t q = i % 2 == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 0xF;
          const double wk = double(code[q]) * absmax[i / kNf4BlockSize];
          ref += x[r * in + k] * wk;
          mag += std::fabs(x[r * in + k] * wk);
        }
        EXPECT_NEAR(y[r * out + o], ref, 2e-5 * mag + 1e-12) << "row " << r << " o " << o;
      }
    }
  }
}

}  // namespace
}  // namespace lorad::kernels
