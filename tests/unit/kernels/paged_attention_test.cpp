// The paged decode attention CPU reference against the formula written out in double precision on
// contiguous keys: the blocks of a row may lie anywhere in the pool (shuffled tables), rows of
// different lengths do not see each other's keys, grouped-query heads read their own KV head, and
// bf16 inputs give the fp32 result rounded once.
#include "kernels/paged_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/bfloat16.h"

namespace lorad::kernels {
namespace {

struct Problem {
  PagedAttentionShape shape;
  std::vector<int32_t> lengths;       // [rows]
  std::vector<int32_t> tables;        // [rows, max_blocks]
  std::vector<float> q;               // [rows, heads, D]
  std::vector<float> k_pool, v_pool;  // [slots, kv_heads, D]
  // The same keys and values per row, contiguous: [rows][t][kv_heads][D].
  std::vector<std::vector<float>> k_rows, v_rows;
};

Problem MakeProblem(const std::vector<int32_t>& lengths, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, int64_t block_size, std::mt19937& rng) {
  Problem p;
  p.lengths = lengths;
  p.shape.rows = static_cast<int64_t>(lengths.size());
  p.shape.heads = heads;
  p.shape.kv_heads = kv_heads;
  p.shape.head_dim = head_dim;
  p.shape.block_size = block_size;
  int64_t max_blocks = 1, total_blocks = 0;
  for (int32_t n : lengths) {
    const int64_t blocks = (n + block_size - 1) / block_size;
    max_blocks = std::max(max_blocks, blocks);
    total_blocks += blocks;
  }
  p.shape.max_blocks = max_blocks;
  const int64_t pool_blocks = total_blocks + 3;  // spare blocks nobody owns
  std::vector<int32_t> order(static_cast<size_t>(pool_blocks));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t row_width = kv_heads * head_dim;
  p.k_pool.resize(static_cast<size_t>(pool_blocks * block_size * row_width));
  p.v_pool.resize(p.k_pool.size());
  for (auto& v : p.k_pool) v = normal(rng);  // spare blocks hold noise that must not leak in
  for (auto& v : p.v_pool) v = normal(rng);
  p.tables.assign(static_cast<size_t>(p.shape.rows * max_blocks), 0);
  size_t next = 0;
  for (int64_t b = 0; b < p.shape.rows; ++b) {
    const int32_t n = lengths[b];
    for (int64_t i = 0; i < (n + block_size - 1) / block_size; ++i) {
      p.tables[b * max_blocks + i] = order[next++];
    }
    p.k_rows.emplace_back(static_cast<size_t>(n * row_width));
    p.v_rows.emplace_back(static_cast<size_t>(n * row_width));
    for (int32_t t = 0; t < n; ++t) {
      const int64_t slot = p.tables[b * max_blocks + t / block_size] * block_size + t % block_size;
      for (int64_t e = 0; e < row_width; ++e) {
        p.k_rows[b][t * row_width + e] = p.k_pool[slot * row_width + e];
        p.v_rows[b][t * row_width + e] = p.v_pool[slot * row_width + e];
      }
    }
  }
  p.q.resize(static_cast<size_t>(p.shape.rows * heads * head_dim));
  for (auto& v : p.q) v = normal(rng);
  return p;
}

// softmax(q k / sqrt(D)) v per row and head, in double, over the row's contiguous keys.
std::vector<double> Expected(const Problem& p, float scale) {
  const auto& s = p.shape;
  const int64_t group = s.heads / s.kv_heads;
  std::vector<double> out(static_cast<size_t>(s.rows * s.heads * s.head_dim));
  for (int64_t b = 0; b < s.rows; ++b) {
    for (int64_t h = 0; h < s.heads; ++h) {
      const int64_t g = h / group;
      const int32_t n = p.lengths[b];
      std::vector<double> w(static_cast<size_t>(n));
      for (int32_t t = 0; t < n; ++t) {
        double dot = 0;
        for (int64_t d = 0; d < s.head_dim; ++d) {
          dot += double(p.q[(b * s.heads + h) * s.head_dim + d]) *
                 p.k_rows[b][(t * s.kv_heads + g) * s.head_dim + d];
        }
        w[t] = dot * scale;
      }
      const double m = *std::max_element(w.begin(), w.end());
      double sum = 0;
      for (double& v : w) sum += (v = std::exp(v - m));
      for (int64_t d = 0; d < s.head_dim; ++d) {
        double acc = 0;
        for (int32_t t = 0; t < n; ++t) {
          acc += w[t] * p.v_rows[b][(t * s.kv_heads + g) * s.head_dim + d];
        }
        out[(b * s.heads + h) * s.head_dim + d] = acc / sum;
      }
    }
  }
  return out;
}

TEST(PagedAttentionTest, ScatteredBlocksEqualContiguousAttentionFp32) {
  std::mt19937 rng(7);
  // Lengths: one key, a partial block, exact blocks, many blocks; GQA 8 heads over 2 KV heads.
  const Problem p = MakeProblem({1, 5, 16, 33, 100}, 8, 2, 32, 16, rng);
  const float scale = 1.0f / std::sqrt(32.0f);
  std::vector<float> out(p.q.size(), NAN);
  paged_attention_cpu(p.q.data(), p.k_pool.data(), p.v_pool.data(), FloatKind::kF32,
                      p.tables.data(), p.lengths.data(), p.shape, scale, out.data());
  const std::vector<double> want = Expected(p, scale);
  for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], want[i], 2e-5) << "element " << i;
}

TEST(PagedAttentionTest, OneKeyReturnsItsValue) {
  std::mt19937 rng(3);
  const Problem p = MakeProblem({1, 1}, 4, 4, 8, 4, rng);
  std::vector<float> out(p.q.size());
  paged_attention_cpu(p.q.data(), p.k_pool.data(), p.v_pool.data(), FloatKind::kF32,
                      p.tables.data(), p.lengths.data(), p.shape, 0.5f, out.data());
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t e = 0; e < 4 * 8; ++e) EXPECT_EQ(out[b * 32 + e], p.v_rows[b][e]);
  }
}

TEST(PagedAttentionTest, Bf16RoundsTheFp32ResultOnce) {
  std::mt19937 rng(11);
  Problem p = MakeProblem({7, 40}, 4, 1, 64, 8, rng);
  // Make the inputs exactly representable in bf16, so both runs see the same values.
  auto round = [](std::vector<float>& v) {
    for (float& x : v) x = bf16_to_float(float_to_bf16(x));
  };
  round(p.q);
  round(p.k_pool);
  round(p.v_pool);
  auto to_bf16 = [](const std::vector<float>& v) {
    std::vector<uint16_t> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = float_to_bf16(v[i]);
    return r;
  };
  const auto q16 = to_bf16(p.q), k16 = to_bf16(p.k_pool), v16 = to_bf16(p.v_pool);
  std::vector<uint16_t> out16(p.q.size());
  std::vector<float> out32(p.q.size());
  paged_attention_cpu(q16.data(), k16.data(), v16.data(), FloatKind::kBF16, p.tables.data(),
                      p.lengths.data(), p.shape, 0.125f, out16.data());
  paged_attention_cpu(p.q.data(), p.k_pool.data(), p.v_pool.data(), FloatKind::kF32,
                      p.tables.data(), p.lengths.data(), p.shape, 0.125f, out32.data());
  for (size_t i = 0; i < out16.size(); ++i) ASSERT_EQ(out16[i], float_to_bf16(out32[i])) << i;
}

TEST(PagedAttentionTest, CheckNamesTheProblem) {
  PagedAttentionShape s{2, 6, 4, 32, 16, 4};
  EXPECT_STRNE(paged_attention_check(s), "");  // 4 KV heads do not divide 6 heads
  s.kv_heads = 3;
  EXPECT_STREQ(paged_attention_check(s), "");
  s.block_size = 0;
  EXPECT_STRNE(paged_attention_check(s), "");
}

}  // namespace
}  // namespace lorad::kernels
