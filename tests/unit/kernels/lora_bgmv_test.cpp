// The multi-adapter LoRA CPU reference against the formula written out in double precision with
// explicit per-adapter matrices: each row gets its own adapter's delta, rows without an adapter
// are untouched, and SGMV equals BGMV with the segments spelled out per row.
#include "kernels/lora_bgmv.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/bfloat16.h"

namespace lorad::kernels {
namespace {

struct Adapters {
  std::vector<std::vector<float>> a, b;  // [rank, in], [out, rank]
  std::vector<const void*> a_ptr, b_ptr;
  std::vector<int32_t> rank;
  std::vector<float> scale;
  LoraAdapterTable Table() const {
    int32_t max_rank = 0;
    for (int32_t r : rank) max_rank = std::max(max_rank, r);
    return {
        a_ptr.data(), b_ptr.data(), rank.data(), scale.data(), static_cast<int32_t>(rank.size()),
        max_rank};
  }
};

Adapters MakeAdapters(const std::vector<int32_t>& ranks, int64_t in, int64_t out,
                      std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 0.1f);
  Adapters ad;
  for (const int32_t r : ranks) {
    ad.a.emplace_back(r * in);
    ad.b.emplace_back(out * r);
    for (auto& v : ad.a.back()) v = normal(rng);
    for (auto& v : ad.b.back()) v = normal(rng);
    ad.rank.push_back(r);
    ad.scale.push_back(16.f / r);
  }
  for (size_t s = 0; s < ranks.size(); ++s) {
    ad.a_ptr.push_back(ad.a[s].data());
    ad.b_ptr.push_back(ad.b[s].data());
  }
  return ad;
}

TEST(LoraBgmv, EachRowGetsItsOwnAdaptersDelta) {
  const int64_t in = 77, out = 45, rows = 9;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.f, 1.f);
  const Adapters ad = MakeAdapters({4, 16, 7}, in, out, rng);
  std::vector<float> x(rows * in), y(rows * out);
  for (auto& v : x) v = normal(rng);
  for (auto& v : y) v = normal(rng);
  const std::vector<int32_t> index = {0, 1, -1, 2, 2, 1, 3, 0, -5};  // 3 and -5: no adapter
  std::vector<float> got = y;
  lora_bgmv_cpu(x.data(), FloatKind::kF32, rows, in, index.data(), ad.Table(), out, got.data());
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t s = index[r];
    for (int64_t o = 0; o < out; ++o) {
      if (s < 0 || s >= 3) {
        EXPECT_EQ(got[r * out + o], y[r * out + o]) << "row " << r;
        continue;
      }
      double delta = 0, mag = 0;
      for (int32_t k = 0; k < ad.rank[s]; ++k) {
        double t = 0;
        for (int64_t i = 0; i < in; ++i) t += double(ad.a[s][k * in + i]) * x[r * in + i];
        delta += double(ad.b[s][o * ad.rank[s] + k]) * t;
        mag += std::fabs(double(ad.b[s][o * ad.rank[s] + k]) * t);
      }
      const double want = y[r * out + o] + ad.scale[s] * delta;
      EXPECT_NEAR(got[r * out + o], want, 1e-5 * (std::fabs(y[r * out + o]) + ad.scale[s] * mag))
          << "row " << r << " o " << o;
    }
  }
}

TEST(LoraBgmv, SgmvEqualsBgmvWithTheSegmentsSpelledOut) {
  const int64_t in = 64, out = 33;
  std::mt19937 rng(9);
  std::normal_distribution<float> normal(0.f, 1.f);
  const Adapters ad = MakeAdapters({8, 3}, in, out, rng);
  const std::vector<int64_t> starts = {0, 5, 5, 12, 20};  // an empty segment too
  const std::vector<int32_t> segment_adapter = {1, 0, -1, 0};
  const int64_t rows = starts.back();
  std::vector<int32_t> per_row;
  for (size_t g = 0; g + 1 < starts.size(); ++g) {
    for (int64_t r = starts[g]; r < starts[g + 1]; ++r) per_row.push_back(segment_adapter[g]);
  }
  std::vector<float> x(rows * in), y(rows * out);
  for (auto& v : x) v = normal(rng);
  for (auto& v : y) v = normal(rng);
  std::vector<float> bgmv = y, sgmv = y;
  lora_bgmv_cpu(x.data(), FloatKind::kF32, rows, in, per_row.data(), ad.Table(), out, bgmv.data());
  lora_sgmv_cpu(x.data(), FloatKind::kF32, in, starts.data(), segment_adapter.data(),
                static_cast<int64_t>(segment_adapter.size()), ad.Table(), out, sgmv.data());
  EXPECT_EQ(std::memcmp(bgmv.data(), sgmv.data(), bgmv.size() * sizeof(float)), 0);
  EXPECT_NE(bgmv, y);
}

TEST(LoraBgmv, Bf16IsTheFp32ResultOfTheBf16ValuesRoundedOnce) {
  const int64_t in = 40, out = 24, rows = 3;
  std::mt19937 rng(13);
  std::normal_distribution<float> normal(0.f, 1.f);
  Adapters ad = MakeAdapters({5, 2}, in, out, rng);
  // Round the fp32 inputs to bf16 values, so both runs see identical numbers.
  auto round_all = [](std::vector<float>& v) {
    for (auto& e : v) e = bf16_to_float(float_to_bf16(e));
  };
  for (auto& m : ad.a) round_all(m);
  for (auto& m : ad.b) round_all(m);
  std::vector<float> x(rows * in), y(rows * out);
  for (auto& v : x) v = normal(rng);
  for (auto& v : y) v = normal(rng);
  round_all(x);
  round_all(y);
  auto to_bf16 = [](const std::vector<float>& v) {
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = float_to_bf16(v[i]);
    return h;
  };
  std::vector<std::vector<uint16_t>> a16, b16;
  for (size_t s = 0; s < ad.a.size(); ++s) {
    a16.push_back(to_bf16(ad.a[s]));
    b16.push_back(to_bf16(ad.b[s]));
  }
  Adapters ad16 = ad;
  for (size_t s = 0; s < ad.a.size(); ++s) {
    ad16.a_ptr[s] = a16[s].data();
    ad16.b_ptr[s] = b16[s].data();
  }
  const std::vector<int32_t> index = {1, -1, 0};
  std::vector<float> y32 = y;
  std::vector<uint16_t> x16 = to_bf16(x), y16 = to_bf16(y);
  lora_bgmv_cpu(x.data(), FloatKind::kF32, rows, in, index.data(), ad.Table(), out, y32.data());
  lora_bgmv_cpu(x16.data(), FloatKind::kBF16, rows, in, index.data(), ad16.Table(), out,
                y16.data());
  for (size_t i = 0; i < y32.size(); ++i) EXPECT_EQ(y16[i], float_to_bf16(y32[i])) << i;
}

TEST(Bfloat16, RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 1.0f / 256)), 1.0f);               // tie, to even
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);  // tie, to even
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
}

}  // namespace
}  // namespace lorad::kernels
