// The fused decoder-layer elementwise references against the formulas written out in double
// precision (fp32 inputs), and, for bf16, against those formulas rounded where transformers' bf16
// code rounds.
#include "kernels/layer_ops.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/bfloat16.h"

namespace lorad::kernels {
namespace {

std::vector<float> Random(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = float_to_bf16(v[i]);
  return r;
}

float RoundBf16(double v) { return bf16_to_float(float_to_bf16(static_cast<float>(v))); }

TEST(LayerOpsTest, RmsNormIsTransformersLlamaRmsNorm) {
  const int64_t rows = 3, width = 96;
  const std::vector<float> x = Random(rows * width, 1), w = Random(width, 2);
  std::vector<float> out(x.size());
  rms_norm_cpu(x.data(), w.data(), FloatKind::kF32, rows, width, 1e-5f, out.data());
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int64_t i = 0; i < width; ++i) sum += double(x[r * width + i]) * x[r * width + i];
    const double inv = 1.0 / std::sqrt(sum / width + 1e-5);
    for (int64_t i = 0; i < width; ++i) {
      EXPECT_NEAR(out[r * width + i], w[i] * x[r * width + i] * inv, 1e-5) << r << "," << i;
    }
  }
}

TEST(LayerOpsTest, RmsNormBf16RoundsTheNormedValueThenTheProduct) {
  const int64_t width = 64;
  const auto x16 = ToBf16(Random(width, 3)), w16 = ToBf16(Random(width, 4));
  std::vector<uint16_t> out(width);
  rms_norm_cpu(x16.data(), w16.data(), FloatKind::kBF16, 1, width, 1e-6f, out.data());
  double sum = 0;
  for (uint16_t v : x16) sum += double(bf16_to_float(v)) * bf16_to_float(v);
  const double inv = 1.0 / std::sqrt(sum / width + 1e-6);
  for (int64_t i = 0; i < width; ++i) {
    const float normed = RoundBf16(bf16_to_float(x16[i]) * inv);
    // The fp32 and double inverse norms may differ in the last fp32 bit: one bf16 unit at most.
    EXPECT_NEAR(bf16_to_float(out[i]), RoundBf16(double(bf16_to_float(w16[i])) * normed),
                std::fabs(bf16_to_float(w16[i]) * normed) / 128 + 1e-30)
        << i;
  }
}

TEST(LayerOpsTest, RotaryIsApplyRotaryPosEmb) {
  const int64_t rows = 2, heads = 3, d = 8;
  const std::vector<float> x = Random(rows * heads * d, 5);
  std::vector<float> cos(rows * d), sin(rows * d);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < d; ++i) {
      const double angle = (r + 3) * std::pow(10000.0, -2.0 * (i % (d / 2)) / d);
      cos[r * d + i] = static_cast<float>(std::cos(angle));
      sin[r * d + i] = static_cast<float>(std::sin(angle));
    }
  }
  std::vector<float> out(x.size());
  rotary_cpu(x.data(), cos.data(), sin.data(), FloatKind::kF32, rows, heads, d, out.data());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* v = &x[(r * heads + h) * d];
      for (int64_t i = 0; i < d / 2; ++i) {
        // The pair (i, i + d/2) rotates by the angle of i.
        const double c = cos[r * d + i], s = sin[r * d + i];
        EXPECT_NEAR(out[(r * heads + h) * d + i], v[i] * c - v[i + d / 2] * s, 1e-6);
        EXPECT_NEAR(out[(r * heads + h) * d + i + d / 2], v[i + d / 2] * c + v[i] * s, 1e-6);
      }
    }
  }
}

// The residual add rounded to bf16 (torch's bf16 add), then LlamaRMSNorm of the rounded sum.
TEST(LayerOpsTest, AddRmsNormNormsTheRoundedSum) {
  const int64_t rows = 2, width = 64;
  const auto x16 = ToBf16(Random(rows * width, 8)), d16 = ToBf16(Random(rows * width, 9));
  const auto w16 = ToBf16(Random(width, 10));
  std::vector<uint16_t> sum(x16.size()), out(x16.size());
  add_rms_norm_cpu(x16.data(), d16.data(), w16.data(), FloatKind::kBF16, rows, width, 1e-6f,
                   sum.data(), out.data());
  for (int64_t r = 0; r < rows; ++r) {
    double squares = 0;
    for (int64_t i = 0; i < width; ++i) {
      const size_t at = r * width + i;
      const float want = RoundBf16(double(bf16_to_float(x16[at])) + bf16_to_float(d16[at]));
      ASSERT_EQ(bf16_to_float(sum[at]), want) << r << "," << i;
      squares += double(want) * want;
    }
    const double inv = 1.0 / std::sqrt(squares / width + 1e-6);
    for (int64_t i = 0; i < width; ++i) {
      const size_t at = r * width + i;
      const float normed = RoundBf16(bf16_to_float(sum[at]) * inv);
      const float want = RoundBf16(double(bf16_to_float(w16[i])) * normed);
      EXPECT_NEAR(bf16_to_float(out[at]), want, std::fabs(want) / 128 + 1e-30) << r << "," << i;
    }
  }
}

// q rotated in place of the output, k rotated into its row's slot of the key pool, v copied
// into the same slot of the value pool; every other slot untouched.
TEST(LayerOpsTest, RotaryStoreRotatesQAndKAndFillsTheRowsSlots) {
  const int64_t rows = 2, heads = 4, kv_heads = 2, d = 8, pool_slots = 5;
  const std::vector<int64_t> slots = {3, 0};
  const std::vector<float> q = Random(rows * heads * d, 11), k = Random(rows * kv_heads * d, 12),
                           v = Random(rows * kv_heads * d, 13), cos = Random(rows * d, 14),
                           sin = Random(rows * d, 15);
  const std::vector<float> pool = Random(pool_slots * kv_heads * d, 16);
  std::vector<float> q_out(q.size()), k_pool = pool, v_pool = pool;
  RotaryStoreArgs args;
  args.q = q.data(), args.k = k.data(), args.v = v.data(), args.cos = cos.data();
  args.sin = sin.data(), args.slots = slots.data(), args.q_out = q_out.data();
  args.k_pool = k_pool.data(), args.v_pool = v_pool.data();
  args.rows = rows, args.heads = heads, args.kv_heads = kv_heads, args.head_dim = d;
  rotary_store_cpu(args, FloatKind::kF32);
  // apply_rotary_pos_emb: x * cos + rotate_half(x) * sin.
  const auto rotated = [&](const float* x, int64_t r, int64_t i) {
    const double half = i < d / 2 ? -x[i + d / 2] : x[i - d / 2];
    return x[i] * double(cos[r * d + i]) + half * sin[r * d + i];
  };
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < d; ++i) {
        const int64_t at = (r * heads + h) * d + i;
        EXPECT_NEAR(q_out[at], rotated(&q[(r * heads + h) * d], r, i), 1e-5) << at;
      }
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int64_t i = 0; i < d; ++i) {
        const int64_t from = (r * kv_heads + h) * d, to = (slots[r] * kv_heads + h) * d;
        EXPECT_NEAR(k_pool[to + i], rotated(&k[from], r, i), 1e-5) << r << "," << h << "," << i;
        EXPECT_EQ(v_pool[to + i], v[from + i]) << r << "," << h << "," << i;
      }
    }
  }
  for (const int64_t other : {1, 2, 4}) {
    for (int64_t i = 0; i < kv_heads * d; ++i) {
      EXPECT_EQ(k_pool[other * kv_heads * d + i], pool[other * kv_heads * d + i]) << other;
      EXPECT_EQ(v_pool[other * kv_heads * d + i], pool[other * kv_heads * d + i]) << other;
    }
  }
}

TEST(LayerOpsTest, SiluMulIsActTimesUp) {
  const int64_t n = 50;
  const std::vector<float> g = Random(n, 6, 3.0f), u = Random(n, 7);
  std::vector<float> out(n);
  silu_mul_cpu(g.data(), u.data(), FloatKind::kF32, n, out.data());
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_NEAR(out[i], g[i] / (1 + std::exp(-double(g[i]))) * u[i], 1e-5) << i;
  }
  const auto g16 = ToBf16(g), u16 = ToBf16(u);
  std::vector<uint16_t> out16(n);
  silu_mul_cpu(g16.data(), u16.data(), FloatKind::kBF16, n, out16.data());
  for (int64_t i = 0; i < n; ++i) {
    const double gv = bf16_to_float(g16[i]);
    const float silu = RoundBf16(gv / (1 + std::exp(-gv)));
    const float want = RoundBf16(double(silu) * bf16_to_float(u16[i]));
    EXPECT_NEAR(bf16_to_float(out16[i]), want, std::fabs(want) / 128 + 1e-30) << i;
  }
}

}  // namespace
}  // namespace lorad::kernels
