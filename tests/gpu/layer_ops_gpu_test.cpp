// The fused decoder-layer elementwise CUDA kernels against their CPU references
// (kernels/layer_ops.cpp): fp32 and bf16, Llama-3-8B widths (hidden 4096, 32 heads of 128,
// intermediate 14336) and odd sizes. Needs a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "kernels/bfloat16.h"
#include "kernels/layer_ops.h"
#include "tests/gpu/float_values.h"
#include "tests/gpu/gpu_buffer.h"

namespace lorad::kernels {
namespace {

using gpu_test::GpuBuffer;
using gpu_test::RandomValues;
using gpu_test::ValueAt;

// `ulps` units of the element type's precision, relative to the expected value, plus `floor`.
void ExpectClose(const std::vector<char>& got, const std::vector<char>& want, FloatKind kind,
                 float ulps, float floor) {
  const size_t n = want.size() / FloatKindSize(kind);
  const float unit = kind == FloatKind::kF32 ? 1.0f / (1 << 23) : 1.0f / 128;
  for (size_t i = 0; i < n; ++i) {
    const float w = ValueAt(want, kind, i), g = ValueAt(got, kind, i);
    ASSERT_NEAR(g, w, ulps * unit * std::fabs(w) + floor) << "element " << i;
  }
}

class LayerOpsGpuTest : public ::testing::TestWithParam<FloatKind> {};

TEST_P(LayerOpsGpuTest, RmsNorm) {
  const FloatKind kind = GetParam();
  // 4096: the row in registers; 10240 (both kinds) and 100 (bf16): the looping kernel.
  for (const auto& [rows, width] :
       {std::pair<int64_t, int64_t>{1, 4096}, {32, 4096}, {3, 100}, {2, 10240}}) {
    const auto x = RandomValues(rows * width, kind, 1), w = RandomValues(width, kind, 2);
    std::vector<char> want(x.size());
    rms_norm_cpu(x.data(), w.data(), kind, rows, width, 1e-5f, want.data());
    GpuBuffer<char> x_dev(x), w_dev(w), out_dev(x.size());
    LORAD_ASSERT_LAUNCH(
        rms_norm_cuda(x_dev.get(), w_dev.get(), kind, rows, width, 1e-5f, out_dev.get(), nullptr));
    // The sum of squares is reduced in another order: the inverse norm may differ by a few fp32
    // units, which bf16's rounding of the normed value may turn into one bf16 unit, twice.
    ExpectClose(out_dev.Read(), want, kind, kind == FloatKind::kF32 ? 64 : 2.01f, 1e-6f);
  }
}

TEST_P(LayerOpsGpuTest, AddRmsNorm) {
  const FloatKind kind = GetParam();
  // 4096: the row in registers; 10240 (both kinds) and 100 (bf16): the looping kernel.
  for (const auto& [rows, width] :
       {std::pair<int64_t, int64_t>{1, 4096}, {32, 4096}, {3, 100}, {2, 10240}}) {
    const auto x = RandomValues(rows * width, kind, 11),
               delta = RandomValues(rows * width, kind, 12), w = RandomValues(width, kind, 13);
    std::vector<char> want_sum(x.size()), want(x.size());
    add_rms_norm_cpu(x.data(), delta.data(), w.data(), kind, rows, width, 1e-5f, want_sum.data(),
                     want.data());
    GpuBuffer<char> x_dev(x), d_dev(delta), w_dev(w), sum_dev(x.size()), out_dev(x.size());
    LORAD_ASSERT_LAUNCH(add_rms_norm_cuda(x_dev.get(), d_dev.get(), w_dev.get(), kind, rows, width,
                                          1e-5f, sum_dev.get(), out_dev.get(), nullptr));
    EXPECT_EQ(sum_dev.Read(), want_sum);  // one rounded add: bit for bit
    // The norm as RmsNorm above (the sum of squares in another order).
    ExpectClose(out_dev.Read(), want, kind, kind == FloatKind::kF32 ? 64 : 2.01f, 1e-6f);
  }
}

TEST_P(LayerOpsGpuTest, RotaryIsBitExact) {
  const FloatKind kind = GetParam();
  for (const auto& [rows, heads, d] :
       {std::tuple<int64_t, int64_t, int64_t>{1, 32, 128}, {32, 8, 128}, {5, 3, 64}, {2, 3, 12}}) {
    const auto x = RandomValues(rows * heads * d, kind, 3), c = RandomValues(rows * d, kind, 4),
               s = RandomValues(rows * d, kind, 5);
    std::vector<char> want(x.size());
    rotary_cpu(x.data(), c.data(), s.data(), kind, rows, heads, d, want.data());
    GpuBuffer<char> x_dev(x), c_dev(c), s_dev(s), out_dev(x.size());
    LORAD_ASSERT_LAUNCH(rotary_cuda(x_dev.get(), c_dev.get(), s_dev.get(), kind, rows, heads, d,
                                    out_dev.get(), nullptr));
    EXPECT_EQ(out_dev.Read(), want);  // same operations, same order: bit for bit
  }
}

// rotary_store_cuda against rotary_store_cpu for `rows` decode rows of q (given) and random k, v,
// cos, sin (from `seed` on), written to slots scattered over a pool whose other slots must stay.
void ExpectRotaryStoreMatches(const std::vector<char>& q, FloatKind kind, int64_t rows,
                              int64_t heads, int64_t kv_heads, int64_t d, uint32_t seed) {
  const int64_t pool_slots = 2 * rows + 5;
  std::vector<int64_t> slots(rows);
  for (int64_t r = 0; r < rows; ++r) slots[r] = (7 * r + 3) % pool_slots;  // distinct
  const auto k = RandomValues(rows * kv_heads * d, kind, seed),
             v = RandomValues(rows * kv_heads * d, kind, seed + 1),
             c = RandomValues(rows * d, kind, seed + 2), s = RandomValues(rows * d, kind, seed + 3),
             pool = RandomValues(pool_slots * kv_heads * d, kind, seed + 4);
  std::vector<char> want_q(q.size()), want_k = pool, want_v = pool;
  RotaryStoreArgs args;
  args.q = q.data(), args.k = k.data(), args.v = v.data(), args.cos = c.data();
  args.sin = s.data(), args.slots = slots.data(), args.q_out = want_q.data();
  args.k_pool = want_k.data(), args.v_pool = want_v.data();
  args.rows = rows, args.heads = heads, args.kv_heads = kv_heads, args.head_dim = d;
  rotary_store_cpu(args, kind);
  GpuBuffer<char> q_dev(q), k_dev(k), v_dev(v), c_dev(c), s_dev(s), q_out(q.size()), k_pool(pool),
      v_pool(pool);
  GpuBuffer<int64_t> slots_dev(slots);
  args.q = q_dev.get(), args.k = k_dev.get(), args.v = v_dev.get(), args.cos = c_dev.get();
  args.sin = s_dev.get(), args.slots = slots_dev.get(), args.q_out = q_out.get();
  args.k_pool = k_pool.get(), args.v_pool = v_pool.get();
  LORAD_ASSERT_LAUNCH(rotary_store_cuda(args, kind, nullptr));
  EXPECT_EQ(q_out.Read(), want_q);
  EXPECT_EQ(k_pool.Read(), want_k);
  EXPECT_EQ(v_pool.Read(), want_v);
}

// A decode step's rotary of q and k and its paged-cache write: rows scattered over a pool, slots
// not in row order, the pool's other slots left as they were.
TEST_P(LayerOpsGpuTest, RotaryStoreIsBitExact) {
  const FloatKind kind = GetParam();
  for (const auto& [rows, heads, kv_heads, d] :
       {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 32, 8, 128},
        {32, 32, 8, 128},
        {3, 4, 2, 12}}) {
    ExpectRotaryStoreMatches(RandomValues(rows * heads * d, kind, 21), kind, rows, heads, kv_heads,
                             d, 22);
  }
}

TEST_P(LayerOpsGpuTest, SiluMul) {
  const FloatKind kind = GetParam();
  for (const int64_t n : {int64_t{14336}, int64_t{32 * 14336}, int64_t{77}}) {
    const auto g = RandomValues(n, kind, 6, 3.0f), u = RandomValues(n, kind, 7);
    std::vector<char> want(g.size());
    silu_mul_cpu(g.data(), u.data(), kind, n, want.data());
    GpuBuffer<char> g_dev(g), u_dev(u), out_dev(g.size());
    LORAD_ASSERT_LAUNCH(silu_mul_cuda(g_dev.get(), u_dev.get(), kind, n, out_dev.get(), nullptr));
    // expf on the device and std::exp on the host may differ by an ulp or two.
    ExpectClose(out_dev.Read(), want, kind, kind == FloatKind::kF32 ? 8 : 1.01f, 1e-30f);
  }
}

TEST_P(LayerOpsGpuTest, RmsNormBackward) {
  const FloatKind kind = GetParam();
  for (const auto& [rows, width] : {std::pair<int64_t, int64_t>{1, 4096}, {64, 4096}, {3, 100}}) {
    const auto x = RandomValues(rows * width, kind, 8), w = RandomValues(width, kind, 9),
               dy = RandomValues(rows * width, kind, 10);
    std::vector<char> want(x.size());
    rms_norm_backward_cpu(x.data(), w.data(), dy.data(), kind, rows, width, 1e-5f, want.data());
    GpuBuffer<char> x_dev(x), w_dev(w), dy_dev(dy), dx_dev(x.size());
    LORAD_ASSERT_LAUNCH(rms_norm_backward_cuda(x_dev.get(), w_dev.get(), dy_dev.get(), kind, rows,
                                               width, 1e-5f, dx_dev.get(), nullptr));
    // Two sums reduced in another order, and a difference of two terms that may cancel: relative
    // to the row's scale (the floor) rather than to each element.
    ExpectClose(dx_dev.Read(), want, kind, kind == FloatKind::kF32 ? 256 : 2.01f,
                kind == FloatKind::kF32 ? 1e-5f : 2e-2f);
  }
}

TEST_P(LayerOpsGpuTest, SiluMulBackward) {
  const FloatKind kind = GetParam();
  for (const int64_t n : {int64_t{14336}, int64_t{64 * 14336}, int64_t{77}}) {
    const auto g = RandomValues(n, kind, 11, 3.0f), u = RandomValues(n, kind, 12),
               dy = RandomValues(n, kind, 13);
    std::vector<char> want_gate(g.size()), want_up(g.size());
    silu_mul_backward_cpu(g.data(), u.data(), dy.data(), kind, n, want_gate.data(), want_up.data());
    GpuBuffer<char> g_dev(g), u_dev(u), dy_dev(dy), d_gate(g.size()), d_up(g.size());
    LORAD_ASSERT_LAUNCH(silu_mul_backward_cuda(g_dev.get(), u_dev.get(), dy_dev.get(), kind, n,
                                               d_gate.get(), d_up.get(), nullptr));
    // expf on the device and std::exp on the host may differ by an ulp or two, which the
    // sigmoid's derivative and bf16's rounding of silu may carry one unit further.
    ExpectClose(d_up.Read(), want_up, kind, kind == FloatKind::kF32 ? 8 : 2.01f, 1e-30f);
    ExpectClose(d_gate.Read(), want_gate, kind, kind == FloatKind::kF32 ? 64 : 2.01f, 1e-6f);
  }
}

// The other models lorad serves (README): hidden 576 (SmolLM-135M), 896 (Qwen2-0.5B), 960
// (SmolLM-360M), 1536 (Qwen2-1.5B), 2048 (TinyLlama): every one a row the norm keeps in registers
// (a multiple of 8 and at most 8192 bf16 / 4096 fp32), most threads of the block holding none of
// it; decode rows (1, 32) and a prefill's.
TEST_P(LayerOpsGpuTest, NormsAtOtherModelsHiddenSizes) {
  const FloatKind kind = GetParam();
  for (const int64_t width : {576, 896, 960, 1536, 2048}) {
    for (const int64_t rows : {1, 32, 333}) {
      const auto x = RandomValues(rows * width, kind, 31),
                 delta = RandomValues(rows * width, kind, 32), w = RandomValues(width, kind, 33);
      std::vector<char> want(x.size()), want_sum(x.size()), want_added(x.size());
      rms_norm_cpu(x.data(), w.data(), kind, rows, width, 1e-6f, want.data());
      add_rms_norm_cpu(x.data(), delta.data(), w.data(), kind, rows, width, 1e-6f, want_sum.data(),
                       want_added.data());
      GpuBuffer<char> x_dev(x), d_dev(delta), w_dev(w), out_dev(x.size()), sum_dev(x.size()),
          added_dev(x.size());
      LORAD_ASSERT_LAUNCH(rms_norm_cuda(x_dev.get(), w_dev.get(), kind, rows, width, 1e-6f,
                                        out_dev.get(), nullptr));
      LORAD_ASSERT_LAUNCH(add_rms_norm_cuda(x_dev.get(), d_dev.get(), w_dev.get(), kind, rows,
                                            width, 1e-6f, sum_dev.get(), added_dev.get(), nullptr));
      SCOPED_TRACE(::testing::Message() << "width " << width << ", rows " << rows);
      ExpectClose(out_dev.Read(), want, kind, kind == FloatKind::kF32 ? 64 : 2.01f, 1e-6f);
      EXPECT_EQ(sum_dev.Read(), want_sum);
      ExpectClose(added_dev.Read(), want_added, kind, kind == FloatKind::kF32 ? 64 : 2.01f, 1e-6f);
    }
  }
}

// Rotary and the decode step's rotary + cache write at head_dim 64 with the other models' heads
// (9 over 3, 15 over 5, 14 over 2, 32 over 4) and head_dim 128 with 12 over 2 and 32 over 32.
TEST_P(LayerOpsGpuTest, RotaryAtOtherModelsHeads) {
  const FloatKind kind = GetParam();
  for (const auto& [heads, kv_heads, d] : {std::tuple<int64_t, int64_t, int64_t>{9, 3, 64},
                                           {15, 5, 64},
                                           {14, 2, 64},
                                           {32, 4, 64},
                                           {12, 2, 128},
                                           {32, 32, 128}}) {
    for (const int64_t rows : {1, 32}) {
      SCOPED_TRACE(::testing::Message() << heads << " heads over " << kv_heads << ", head_dim " << d
                                        << ", rows " << rows);
      const auto x = RandomValues(rows * heads * d, kind, 41), c = RandomValues(rows * d, kind, 42),
                 s = RandomValues(rows * d, kind, 43);
      std::vector<char> want(x.size());
      rotary_cpu(x.data(), c.data(), s.data(), kind, rows, heads, d, want.data());
      GpuBuffer<char> x_dev(x), c_dev(c), s_dev(s), out_dev(x.size());
      LORAD_ASSERT_LAUNCH(rotary_cuda(x_dev.get(), c_dev.get(), s_dev.get(), kind, rows, heads, d,
                                      out_dev.get(), nullptr));
      EXPECT_EQ(out_dev.Read(), want);

      ExpectRotaryStoreMatches(x, kind, rows, heads, kv_heads, d, 44);
    }
  }
}

// silu_mul at the other models' intermediate sizes (SmolLM 1536 / 2560, Qwen2 4864 / 8960,
// TinyLlama 5632, Llama-2 11008), a decode row and a batch of 32.
TEST_P(LayerOpsGpuTest, SiluMulAtOtherModelsIntermediateSizes) {
  const FloatKind kind = GetParam();
  for (const int64_t width : {1536, 2560, 4864, 5632, 8960, 11008}) {
    for (const int64_t rows : {1, 32}) {
      const int64_t n = rows * width;
      const auto g = RandomValues(n, kind, 51, 3.0f), u = RandomValues(n, kind, 52);
      std::vector<char> want(g.size());
      silu_mul_cpu(g.data(), u.data(), kind, n, want.data());
      GpuBuffer<char> g_dev(g), u_dev(u), out_dev(g.size());
      LORAD_ASSERT_LAUNCH(silu_mul_cuda(g_dev.get(), u_dev.get(), kind, n, out_dev.get(), nullptr));
      SCOPED_TRACE(::testing::Message() << "width " << width << ", rows " << rows);
      ExpectClose(out_dev.Read(), want, kind, kind == FloatKind::kF32 ? 8 : 1.01f, 1e-30f);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, LayerOpsGpuTest,
                         ::testing::Values(FloatKind::kF32, FloatKind::kBF16));

}  // namespace
}  // namespace lorad::kernels
