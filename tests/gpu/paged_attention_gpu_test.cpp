// The paged decode attention CUDA kernel against its CPU reference (kernels/paged_attention.cpp):
// fp32 and bf16, Llama-3-8B heads (32 over 8 KV heads, head_dim 128), head_dim 64 and 256,
// lengths from one key to several tiles, blocks scattered over a pool with foreign blocks between
// them, one query head per block and 2, 4 or 8 sharing one, one block's keys split over a
// cluster. Needs a CUDA device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/bfloat16.h"
#include "kernels/layer_ops.h"
#include "kernels/paged_attention.h"
#include "tests/gpu/float_values.h"
#include "tests/gpu/gpu_buffer.h"

namespace lorad::kernels {
namespace {

using gpu_test::GpuBuffer;
using gpu_test::RandomValues;
using gpu_test::ValueAt;

// A batch's layout in a pool: each row's blocks scattered over a pool twice as large (foreign
// blocks between them), the shape, block tables and the pool's element count.
struct PagedLayout {
  PagedAttentionShape shape;
  std::vector<int32_t> tables;
  size_t pool = 0;  // elements of each of the key and value pools
};

PagedLayout MakeLayout(const std::vector<int32_t>& lengths, int64_t heads, int64_t kv_heads,
                       int64_t head_dim, int64_t block_size, std::mt19937& rng) {
  PagedLayout layout;
  PagedAttentionShape& shape = layout.shape;
  shape.rows = static_cast<int64_t>(lengths.size());
  shape.heads = heads;
  shape.kv_heads = kv_heads;
  shape.head_dim = head_dim;
  shape.block_size = block_size;
  int64_t total = 0;
  shape.max_blocks = 1;
  for (int32_t n : lengths) {
    const int64_t blocks = (n + block_size - 1) / block_size;
    shape.max_blocks = std::max(shape.max_blocks, blocks);
    total += blocks;
  }
  const int64_t pool_blocks = 2 * total + 1;
  std::vector<int32_t> order(static_cast<size_t>(pool_blocks));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  layout.tables.assign(static_cast<size_t>(shape.rows * shape.max_blocks), 0);
  size_t next = 0;
  for (int64_t b = 0; b < shape.rows; ++b) {
    for (int64_t i = 0; i < (lengths[b] + block_size - 1) / block_size; ++i) {
      layout.tables[b * shape.max_blocks + i] = order[next++];
    }
  }
  layout.pool = static_cast<size_t>(pool_blocks * block_size * kv_heads * head_dim);
  return layout;
}

// Tolerance: the kernel's online softmax and its summation order differ from the reference's; the
// outputs are convex combinations of values of magnitude ~1, so an absolute bound of a few fp32
// units on fp32, and on bf16 one unit in the last place (the fp32 results may round to the two
// neighbours of a midpoint; a bf16 unit is at most 2^-7 of the value), plus the fp32 slack.
void RunCase(FloatKind kind, const std::vector<int32_t>& lengths, int64_t heads, int64_t kv_heads,
             int64_t head_dim, int64_t block_size, uint32_t seed) {
  std::mt19937 rng(seed);
  const PagedLayout layout = MakeLayout(lengths, heads, kv_heads, head_dim, block_size, rng);
  const PagedAttentionShape& shape = layout.shape;
  const std::vector<int32_t>& tables = layout.tables;
  const size_t pool = layout.pool;
  const auto q = RandomValues(static_cast<size_t>(shape.rows * heads * head_dim), kind, 3 * seed);
  const auto k = RandomValues(pool, kind, 3 * seed + 1), v = RandomValues(pool, kind, 3 * seed + 2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));

  std::vector<char> want(q.size());
  paged_attention_cpu(q.data(), k.data(), v.data(), kind, tables.data(), lengths.data(), shape,
                      scale, want.data());
  GpuBuffer<char> q_dev(q), k_dev(k), v_dev(v), out_dev(q.size());
  GpuBuffer<int32_t> tables_dev(tables), lengths_dev(lengths);
  LORAD_ASSERT_LAUNCH(paged_attention_cuda(q_dev.get(), k_dev.get(), v_dev.get(), kind,
                                           tables_dev.get(), lengths_dev.get(), shape, scale,
                                           out_dev.get(), nullptr));
  const std::vector<char> got = out_dev.Read();
  const size_t n = q.size() / FloatKindSize(kind);
  for (size_t i = 0; i < n; ++i) {
    const float w = ValueAt(want, kind, i), g = ValueAt(got, kind, i);
    const float tol = kind == FloatKind::kF32 ? 2e-5f : 1e-5f + std::fabs(w) * (1.0f / 128);
    ASSERT_NEAR(g, w, tol) << "element " << i << " (row " << i / (heads * head_dim) << ")";
  }
}

TEST(PagedAttentionGpuTest, Llama8bHeadsFp32) {
  RunCase(FloatKind::kF32, {1, 15, 16, 17, 64, 65, 300}, 32, 8, 128, 16, 1);
}

TEST(PagedAttentionGpuTest, Llama8bHeadsBf16) {
  RunCase(FloatKind::kBF16, {1, 2, 100, 129, 1000, 2048}, 32, 8, 128, 16, 2);
}

TEST(PagedAttentionGpuTest, OtherHeadDimsAndBlockSizes) {
  RunCase(FloatKind::kBF16, {3, 77, 200}, 12, 4, 64, 8, 3);
  RunCase(FloatKind::kF32, {1, 90}, 8, 8, 256, 32, 4);
  RunCase(FloatKind::kBF16, {5, 33}, 4, 1, 32, 1, 5);
}

// From a block per SM on, one block serves all the query heads of a KV head (2, 4 or 8 of them;
// head dims 64 and 128): a decode batch of 64 rows takes those paths on any GPU of up to 256 SMs.
std::vector<int32_t> Lengths(int rows, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> length(1, 400);
  std::vector<int32_t> lengths(static_cast<size_t>(rows));
  for (int32_t& n : lengths) n = length(rng);
  lengths[0] = 1, lengths[1] = 128, lengths[2] = 129;  // one key, one tile, a tile and one key
  return lengths;
}

TEST(PagedAttentionGpuTest, QueryHeadsSharingABlock) {
  RunCase(FloatKind::kBF16, Lengths(64, 6), 32, 8, 128, 16, 6);  // 4 per KV head (Llama-3-8B)
  RunCase(FloatKind::kF32, Lengths(64, 7), 32, 8, 128, 16, 7);
  RunCase(FloatKind::kBF16, Lengths(64, 8), 32, 4, 128, 16, 8);    // 8 (TinyLlama)
  RunCase(FloatKind::kBF16, Lengths(64, 9), 16, 8, 64, 16, 9);     // 2, head_dim 64
  RunCase(FloatKind::kBF16, Lengths(64, 10), 28, 4, 128, 16, 10);  // 7 (Qwen2-7B): one per block
}

// At batches of 1 to 4 (on sm_90) each block's keys are split over a cluster of 2 to 8 blocks,
// merged by the first: lengths with fewer keys than splits (empty ranges), one tile a split,
// several.
TEST(PagedAttentionGpuTest, KeysSplitOverAClusterAtSmallBatches) {
  for (const int32_t n : {1, 3, 129, 300, 2048}) {
    RunCase(FloatKind::kBF16, {n}, 32, 8, 128, 16, 20 + n);
    RunCase(FloatKind::kF32, {n}, 32, 8, 128, 16, 21 + n);
  }
  RunCase(FloatKind::kBF16, {5, 700}, 32, 8, 128, 16, 11);  // two rows: 2 splits
  RunCase(FloatKind::kBF16, {2, 333}, 12, 4, 64, 8, 12);
  RunCase(FloatKind::kF32, {90}, 8, 8, 256, 32, 13);
}

// The step's rotary and cache write done by the attention launch (paged_attention_rotary_cuda)
// against rotary_store_cuda and then paged_attention_cuda: the output and both pools the same
// bits, for one row (keys split over a cluster, a split without keys), a few rows and a batch
// whose blocks serve several query heads, at every length from one key on.
void RunRotaryCase(FloatKind kind, const std::vector<int32_t>& lengths, int64_t heads,
                   int64_t kv_heads, int64_t head_dim, int64_t block_size, uint32_t seed) {
  std::mt19937 rng(seed);
  const PagedLayout layout = MakeLayout(lengths, heads, kv_heads, head_dim, block_size, rng);
  const PagedAttentionShape& shape = layout.shape;
  const std::vector<int32_t>& tables = layout.tables;
  const size_t pool = layout.pool;
  std::vector<int64_t> slots(static_cast<size_t>(shape.rows));
  for (int64_t b = 0; b < shape.rows; ++b) {
    const int64_t last = lengths[b] - 1;  // the new token's key
    slots[b] =
        int64_t{tables[b * shape.max_blocks + last / block_size]} * block_size + last % block_size;
  }
  const size_t q_size = static_cast<size_t>(shape.rows * heads * head_dim);
  const size_t kv_size = static_cast<size_t>(shape.rows * kv_heads * head_dim);
  const auto q = RandomValues(q_size, kind, 5 * seed);
  const auto k_new = RandomValues(kv_size, kind, 5 * seed + 1);
  const auto v_new = RandomValues(kv_size, kind, 5 * seed + 2);
  const auto cos = RandomValues(static_cast<size_t>(shape.rows * head_dim), kind, 5 * seed + 3);
  const auto sin = RandomValues(static_cast<size_t>(shape.rows * head_dim), kind, 5 * seed + 4);
  const auto k = RandomValues(pool, kind, 7 * seed), v = RandomValues(pool, kind, 7 * seed + 1);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  GpuBuffer<char> q_dev(q), k_new_dev(k_new), v_new_dev(v_new), cos_dev(cos), sin_dev(sin);
  GpuBuffer<int32_t> tables_dev(tables), lengths_dev(lengths);
  GpuBuffer<int64_t> slots_dev(slots);

  // Two launches: rotary_store, then attention on its rotated q.
  GpuBuffer<char> k_ref(k), v_ref(v), q_rotated(q.size()), out_ref(q.size());
  RotaryStoreArgs args;
  args.q = q_dev.get(), args.k = k_new_dev.get(), args.v = v_new_dev.get();
  args.cos = cos_dev.get(), args.sin = sin_dev.get(), args.slots = slots_dev.get();
  args.q_out = q_rotated.get(), args.k_pool = k_ref.get(), args.v_pool = v_ref.get();
  args.rows = shape.rows, args.heads = heads, args.kv_heads = kv_heads, args.head_dim = head_dim;
  LORAD_ASSERT_LAUNCH(rotary_store_cuda(args, kind, nullptr));
  LORAD_ASSERT_LAUNCH(paged_attention_cuda(q_rotated.get(), k_ref.get(), v_ref.get(), kind,
                                           tables_dev.get(), lengths_dev.get(), shape, scale,
                                           out_ref.get(), nullptr));
  // One.
  GpuBuffer<char> k_dev(k), v_dev(v), out_dev(q.size());
  PagedAttentionRotary rotary;
  rotary.k = k_new_dev.get(), rotary.v = v_new_dev.get();
  rotary.cos = cos_dev.get(), rotary.sin = sin_dev.get(), rotary.slots = slots_dev.get();
  LORAD_ASSERT_LAUNCH(paged_attention_rotary_cuda(q_dev.get(), k_dev.get(), v_dev.get(), kind,
                                                  tables_dev.get(), lengths_dev.get(), shape, scale,
                                                  rotary, out_dev.get(), nullptr));
  EXPECT_TRUE(out_dev.Read() == out_ref.Read()) << "attention output differs";
  EXPECT_TRUE(k_dev.Read() == k_ref.Read()) << "key pool differs";
  EXPECT_TRUE(v_dev.Read() == v_ref.Read()) << "value pool differs";
}

TEST(PagedAttentionGpuTest, RotaryInTheLaunchGivesTheBitsOfRotaryStoreThenAttention) {
  for (const int32_t n : {1, 3, 17, 129, 300}) {
    RunRotaryCase(FloatKind::kBF16, {n}, 32, 8, 128, 16, 40 + n);  // batch 1: a cluster split
    RunRotaryCase(FloatKind::kF32, {n}, 32, 8, 128, 16, 41 + n);
  }
  RunRotaryCase(FloatKind::kBF16, {5, 700, 1, 64}, 32, 8, 128, 16, 42);
  RunRotaryCase(FloatKind::kBF16, Lengths(64, 43), 32, 8, 128, 16, 43);  // 4 heads a block
  RunRotaryCase(FloatKind::kF32, Lengths(64, 44), 16, 8, 64, 16, 44);    // 2, head_dim 64
  RunRotaryCase(FloatKind::kBF16, {2, 333}, 12, 4, 64, 8, 45);
}

// The heads of the other models lorad serves (README), which no benchmark ran: head_dim 64 with
// 3 (SmolLM-135M: 9 over 3), 5 (SmolLM-360M: 15 over 5), 7 (Qwen2-0.5B: 14 over 2) and 8
// (TinyLlama: 32 over 4) query heads per KV head; head_dim 128 with 6 (Qwen2-1.5B: 12 over 2) and
// 1 (Llama-2-7B: 32 over 32, no GQA). A group of 3, 5 or 7 keeps one query head per block
// (PlanHeadsPerBlock); 6 takes 2 a block and 8 takes 8 at 64 rows. Batch 1 (keys split over a
// cluster), a few rows of one key to several tiles, and 64 rows.
struct ModelHeads {
  int64_t heads, kv_heads, head_dim;
};
constexpr ModelHeads kOtherModelHeads[] = {{9, 3, 64},  {15, 5, 64},  {14, 2, 64},
                                           {32, 4, 64}, {12, 2, 128}, {32, 32, 128}};

TEST(PagedAttentionGpuTest, OtherModelsHeads) {
  uint32_t seed = 100;
  for (const ModelHeads& m : kOtherModelHeads) {
    SCOPED_TRACE(::testing::Message()
                 << m.heads << " heads over " << m.kv_heads << ", head_dim " << m.head_dim);
    for (const FloatKind kind : {FloatKind::kBF16, FloatKind::kF32}) {
      RunCase(kind, {300}, m.heads, m.kv_heads, m.head_dim, 16, seed++);
      RunCase(kind, {1, 17, 128, 129, 700}, m.heads, m.kv_heads, m.head_dim, 16, seed++);
      // 64 rows: where query heads may share a block (not for Llama-2's 32 KV heads, whose pools
      // at 64 rows of up to 400 keys would be 800 MB each on the host).
      if (m.kv_heads < m.heads) {
        RunCase(kind, Lengths(64, seed), m.heads, m.kv_heads, m.head_dim, 16, seed + 1);
      }
      seed += 2;
    }
  }
}

TEST(PagedAttentionGpuTest, RotaryInTheLaunchAtOtherModelsHeads) {
  uint32_t seed = 200;
  for (const ModelHeads& m : kOtherModelHeads) {
    SCOPED_TRACE(::testing::Message()
                 << m.heads << " heads over " << m.kv_heads << ", head_dim " << m.head_dim);
    for (const FloatKind kind : {FloatKind::kBF16, FloatKind::kF32}) {
      RunRotaryCase(kind, {1}, m.heads, m.kv_heads, m.head_dim, 16, seed++);
      RunRotaryCase(kind, {129}, m.heads, m.kv_heads, m.head_dim, 16, seed++);
      RunRotaryCase(kind, {5, 700, 1, 64}, m.heads, m.kv_heads, m.head_dim, 16, seed++);
      if (m.kv_heads < m.heads) {
        RunRotaryCase(kind, Lengths(64, seed), m.heads, m.kv_heads, m.head_dim, 16, seed + 1);
      }
      seed += 2;
    }
  }
}

TEST(PagedAttentionGpuTest, RejectsHeadDimsItCannotServe) {
  PagedAttentionShape shape{1, 4, 4, 48, 16, 1};
  EXPECT_NE(paged_attention_cuda(nullptr, nullptr, nullptr, FloatKind::kBF16, nullptr, nullptr,
                                 shape, 1.0f, nullptr, nullptr),
            nullptr);
}

}  // namespace
}  // namespace lorad::kernels
