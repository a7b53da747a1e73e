// The 8-bit AdamW CPU reference against AdamW written out in double precision on the dequantized
// moments: the update follows the formula, the stored moments are the nearest codes, and a
// non-finite gradient leaves its parameter alone.
#include "kernels/adamw8bit.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kernels/dynamic_quant8.h"

namespace lorad::kernels {
namespace {

constexpr double kLr = 1e-3, kBeta1 = 0.9, kBeta2 = 0.999, kEps = 1e-8, kWd = 0.01;

struct State {
  std::vector<float> param, grad;
  std::vector<uint8_t> q1, q2;
  std::vector<float> absmax1, absmax2;
  explicit State(int64_t n)
      : param(n),
        grad(n),
        q1(n, 0),
        q2(n, 0),
        absmax1((n + 255) / 256, 0.f),
        absmax2((n + 255) / 256, 0.f) {}
  double m(int64_t i) const { return kDynamicMapSigned[q1[i]] * absmax1[i / 256]; }
  double v(int64_t i) const { return kDynamicMapUnsigned[q2[i]] * absmax2[i / 256]; }
};

void Step(State& s, int64_t step) {
  adamw8bit_step_cpu(s.param.data(), s.grad.data(), s.q1.data(), s.q2.data(), s.absmax1.data(),
                     s.absmax2.data(), kDynamicMapSigned, kDynamicMapUnsigned,
                     static_cast<int64_t>(s.param.size()),
                     adamw8bit_scalars(kLr, kBeta1, kBeta2, kEps, kWd, step));
}

TEST(AdamW8bit, CodeIndexIsTheNearestCode) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  for (int i = 0; i < 20000; ++i) {
    const float x = uniform(rng);
    for (const bool is_signed : {true, false}) {
      const float* code = is_signed ? kDynamicMapSigned : kDynamicMapUnsigned;
      const float v = is_signed ? x : std::fabs(x);
      const uint8_t got = dynamic_code_index(code, is_signed ? -1.f : 0.f, v);
      float best = std::numeric_limits<float>::infinity();
      for (int c = 0; c < 256; ++c) best = std::fmin(best, std::fabs(code[c] - v));
      EXPECT_LE(std::fabs(code[got] - v), best * (1 + 1e-6f))
          << "x " << v << " signed " << is_signed;
    }
  }
}

TEST(AdamW8bit, TwoStepsFollowAdamWOnTheDequantizedMoments) {
  const int64_t n = 1000;  // three full blocks and a short one
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.f, 1.f);
  State s(n);
  for (auto& p : s.param) p = normal(rng);
  for (int64_t step = 1; step <= 2; ++step) {
    for (auto& g : s.grad) g = 0.1f * normal(rng);
    const State before = s;
    Step(s, step);
    const double c1 = 1 - std::pow(kBeta1, step), c2 = std::sqrt(1 - std::pow(kBeta2, step));
    for (int64_t i = 0; i < n; ++i) {
      const double g = before.grad[i];
      const double m = kBeta1 * before.m(i) + (1 - kBeta1) * g;
      const double v = kBeta2 * before.v(i) + (1 - kBeta2) * g * g;
      const double p =
          before.param[i] * (1 - kLr * kWd) - kLr * c2 / c1 * m / (std::sqrt(v) + kEps * c2);
      EXPECT_NEAR(s.param[i], p, 1e-6 * std::fabs(p) + 1e-7) << "step " << step << " i " << i;
      // Half the widest gap between neighbouring codes near +-1 (the coarsest part of both maps).
      EXPECT_NEAR(s.m(i), m, 0.0075 * s.absmax1[i / 256] + 1e-12) << "step " << step << " i " << i;
      EXPECT_NEAR(s.v(i), v, 0.0075 * s.absmax2[i / 256] + 1e-12) << "step " << step << " i " << i;
    }
  }
}

TEST(AdamW8bit, NonFiniteGradientLeavesItsParameterAndZeroesItsMoments) {
  const int64_t n = 300;
  State s(n);
  for (int64_t i = 0; i < n; ++i) {
    s.param[i] = 0.5f + 0.001f * i;
    s.grad[i] = 0.01f * (i % 7) - 0.03f;
  }
  Step(s, 1);
  s.grad[5] = std::numeric_limits<float>::quiet_NaN();
  s.grad[260] = std::numeric_limits<float>::infinity();
  const std::vector<float> before = s.param;
  Step(s, 2);
  for (const int64_t i : {5, 260}) {
    EXPECT_EQ(s.param[i], before[i]) << i;
    EXPECT_EQ(s.m(i), 0.0) << i;
    EXPECT_EQ(s.v(i), 0.0) << i;
  }
  EXPECT_NE(s.param[6], before[6]);  // the neighbours still move
}

TEST(AdamW8bit, FreshZeroStateDequantizesToZero) {
  State s(257);
  for (int64_t i = 0; i < 257; ++i) {
    EXPECT_EQ(s.m(i), 0.0);
    EXPECT_EQ(s.v(i), 0.0);
  }
}

}  // namespace
}  // namespace lorad::kernels
