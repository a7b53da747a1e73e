// The sampling CPU reference against its definition. Parity with transformers lives in
// tests/parity/sampling_parity_test.cpp; the CUDA kernels are compared with this reference in
// tests/gpu/sampling_gpu_test.cpp.
#include "kernels/sampling.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kernels/sampling_math.h"

namespace lorad::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Random123's published known-answer vectors for Philox4x32-10 (its tests/kat_vectors): the
// generator is the standard one, so any other implementation can reproduce lorad's draws.
TEST(Sampling, PhiloxMatchesRandom123KnownAnswers) {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    const auto o =
        sampling_math::Philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(o.v[i], k.out[i]) << "word " << i;
  }
}

TEST(Sampling, ExpIsWithinTwoUlpOfTheTrueValue) {
  EXPECT_EQ(sampling_math::ExpNonPositive(0.0f), 1.0f);
  EXPECT_EQ(sampling_math::ExpNonPositive(-kInf), 0.0f);
  EXPECT_EQ(sampling_math::ExpNonPositive(-100.0f), 0.0f);
  for (float x = -87.0f; x <= 0.0f; x += 0.00371f) {
    const double want = std::exp(static_cast<double>(x));
    const double got = sampling_math::ExpNonPositive(x);
    EXPECT_LE(std::fabs(got - want), 2.0 * std::ldexp(1.0, std::ilogb(want) - 23)) << "x=" << x;
  }
}

TEST(Sampling, MassesAreFixedPointWithTheMaxTokenAtOne) {
  EXPECT_EQ(sampling_math::Mass(0.0f), uint64_t{1} << sampling_math::kMassBits);
  EXPECT_EQ(sampling_math::Mass(-kInf), 0u);
  const double half = static_cast<double>(sampling_math::Mass(std::log(0.5f)));
  EXPECT_NEAR(half / std::ldexp(1.0, sampling_math::kMassBits), 0.5, 1e-7);
}

// History: prompt {3, 5}, generated {5, 7, 7, 7}: token 3 prompt only, 5 both, 7 three times.
struct OneRowHistory {
  std::vector<int32_t> tokens = {3, 5, 5, 7, 7, 7};
  std::vector<int64_t> row_begin = {0, 6};
  std::vector<int64_t> generated_begin = {2};
  TokenHistory view() const { return {tokens.data(), row_begin.data(), generated_begin.data()}; }
};

TEST(Sampling, RepetitionPenaltyAppliesOncePerDistinctToken) {
  std::vector<float> x = {1.f, 2.f, 3.f, 4.f, 5.f, -6.f, 7.f, -8.f};
  const std::vector<float> before = x;
  SamplingRow row;
  row.repetition_penalty = 2.0f;
  const OneRowHistory h;
  sampling_penalties_cpu(x.data(), 1, 8, &row, h.view());
  EXPECT_EQ(x[3], before[3] / 2.f);  // positive: divided, once (prompt only)
  EXPECT_EQ(x[5], before[5] * 2.f);  // negative: multiplied, once although it occurs twice
  EXPECT_EQ(x[7], before[7] * 2.f);  // three occurrences, still once
  for (int j : {0, 1, 2, 4, 6}) EXPECT_EQ(x[j], before[j]) << "token " << j << " not in history";
}

TEST(Sampling, PresenceAndFrequencyCountOnlyGeneratedTokens) {
  std::vector<float> x(8, 1.0f);
  SamplingRow row;
  row.presence_penalty = 0.5f;
  row.frequency_penalty = 0.25f;
  const OneRowHistory h;
  sampling_penalties_cpu(x.data(), 1, 8, &row, h.view());
  EXPECT_EQ(x[3], 1.0f);                 // prompt only: untouched
  EXPECT_EQ(x[5], 1.0f - 0.25f - 0.5f);  // once
  EXPECT_EQ(x[7], 1.0f - 0.75f - 0.5f);  // three times
  EXPECT_EQ(x[0], 1.0f);
}

TEST(Sampling, PenaltiesIgnoreIdsOutsideTheVocabularyAndRowsWithoutPenalties) {
  std::vector<float> x(2 * 4, 1.0f);
  SamplingRow rows[2];
  rows[1].repetition_penalty = 2.0f;
  const std::vector<int32_t> tokens = {1, 2, -1, 4, 99};
  const std::vector<int64_t> row_begin = {0, 2, 5}, generated_begin = {1, 3};
  sampling_penalties_cpu(x.data(), 2, 4, rows,
                         {tokens.data(), row_begin.data(), generated_begin.data()});
  for (int j = 0; j < 4; ++j) EXPECT_EQ(x[j], 1.0f) << "row 0 has no penalty";
  for (int j = 4; j < 8; ++j) EXPECT_EQ(x[j], 1.0f) << "row 1's ids are all out of range";
}

TEST(Sampling, WarpLeavesGreedyRowsAlone) {
  std::vector<float> x = {0.5f, -1.f, 3.f, 2.f};
  const std::vector<float> before = x;
  SamplingRow row;
  row.top_k = 1;
  row.top_p = 0.1f;
  row.min_p = 0.5f;  // temperature 0: none of these apply
  sampling_warp_cpu(x.data(), 1, 4, &row);
  EXPECT_EQ(x, before);
}

TEST(Sampling, TopKKeepsTiesWithTheKthValue) {
  std::vector<float> x = {1.f, 5.f, 3.f, 3.f, 0.f, 3.f};
  SamplingRow row;
  row.temperature = 1.0f;
  row.top_k = 2;
  sampling_warp_cpu(x.data(), 1, 6, &row);
  EXPECT_EQ(x, (std::vector<float>{-kInf, 5.f, 3.f, 3.f, -kInf, 3.f}));
}

TEST(Sampling, TopPKeepsTheSmallestSetOverPAndAlwaysTheTop) {
  // Probabilities 0.1, 0.2, 0.3, 0.4: top_p 0.65 keeps {0.4, 0.3} (0.7 >= 0.65).
  const float p[4] = {0.1f, 0.2f, 0.3f, 0.4f};
  std::vector<float> x(4);
  for (int j = 0; j < 4; ++j) x[j] = std::log(p[j]);
  const std::vector<float> before = x;
  SamplingRow row;
  row.temperature = 1.0f;
  row.top_p = 0.65f;
  sampling_warp_cpu(x.data(), 1, 4, &row);
  EXPECT_EQ(x, (std::vector<float>{-kInf, -kInf, before[2], before[3]}));
  row.top_p = 1e-6f;  // less than any one token: the most likely stays
  std::vector<float> y = before;
  sampling_warp_cpu(y.data(), 1, 4, &row);
  EXPECT_EQ(y, (std::vector<float>{-kInf, -kInf, -kInf, before[3]}));
}

TEST(Sampling, MinPRemovesTokensBelowAFractionOfTheTop) {
  const float p[4] = {0.05f, 0.15f, 0.3f, 0.5f};
  std::vector<float> x(4);
  for (int j = 0; j < 4; ++j) x[j] = std::log(p[j]);
  const std::vector<float> before = x;
  SamplingRow row;
  row.temperature = 1.0f;
  row.min_p = 0.2f;  // threshold 0.1: removes 0.05 only
  sampling_warp_cpu(x.data(), 1, 4, &row);
  EXPECT_EQ(x, (std::vector<float>{-kInf, before[1], before[2], before[3]}));
}

TEST(Sampling, GreedyDrawTakesTheFirstOfTiedMaxima) {
  const std::vector<float> x = {1.f, 4.f, -2.f, 4.f, 0.f, 0.f, 0.f, 0.f};
  const SamplingRow rows[2];
  int32_t tokens[2] = {-1, -1};
  sampling_draw_cpu(x.data(), 2, 4, rows, tokens);
  EXPECT_EQ(tokens[0], 1);
  EXPECT_EQ(tokens[1], 0);
}

TEST(Sampling, DrawNeverPicksARemovedToken) {
  const std::vector<float> x = {-kInf, 2.f, -kInf, -kInf};
  SamplingRow row;
  row.temperature = 1.0f;
  for (uint64_t step = 0; step < 200; ++step) {
    row.step = step;
    int32_t token = -1;
    sampling_draw_cpu(x.data(), 1, 4, &row, &token);
    EXPECT_EQ(token, 1) << "step " << step;
  }
}

// 20k seeded draws (steps 0..19999 of one seed: deterministic) of a fixed 4-token distribution.
TEST(Sampling, DrawFrequenciesMatchTheDistribution) {
  const double p[4] = {0.1, 0.2, 0.3, 0.4};
  constexpr int kDraws = 20000;
  std::vector<float> x(4 * kDraws);
  std::vector<SamplingRow> rows(kDraws);
  for (int i = 0; i < kDraws; ++i) {
    for (int j = 0; j < 4; ++j) x[4 * i + j] = static_cast<float>(std::log(p[j]));
    rows[i].temperature = 1.0f;
    rows[i].seed = 2024;
    rows[i].step = i;
  }
  std::vector<int32_t> tokens(kDraws);
  sampling_draw_cpu(x.data(), kDraws, 4, rows.data(), tokens.data());
  std::vector<int> counts(4, 0);
  for (int32_t t : tokens) ++counts[t];
  for (int j = 0; j < 4; ++j) {
    EXPECT_NEAR(counts[j] / static_cast<double>(kDraws), p[j], 0.02) << "token " << j;
  }
}

TEST(Sampling, ADrawDependsOnlyOnSeedAndStep) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.f, 2.f);
  constexpr int64_t kVocab = 300;
  std::vector<float> row(kVocab);
  for (float& v : row) v = normal(rng);
  SamplingRow mine;
  mine.temperature = 0.8f;
  mine.seed = 77;
  mine.step = 5;
  int32_t alone = -1;
  sampling_draw_cpu(row.data(), 1, kVocab, &mine, &alone);
  // The same row at index 6 of a batch of 8 whose other rows have other logits and parameters.
  std::vector<float> batch(8 * kVocab);
  std::vector<SamplingRow> rows(8);
  for (int b = 0; b < 8; ++b) {
    for (int64_t j = 0; j < kVocab; ++j) batch[b * kVocab + j] = b == 6 ? row[j] : normal(rng);
    rows[b] = mine;
    rows[b].seed = b == 6 ? mine.seed : 1000 + b;
    rows[b].temperature = b == 6 ? mine.temperature : 1.5f;
  }
  std::vector<int32_t> tokens(8);
  sampling_draw_cpu(batch.data(), 8, kVocab, rows.data(), tokens.data());
  EXPECT_EQ(tokens[6], alone);
}

}  // namespace
}  // namespace lorad::kernels
