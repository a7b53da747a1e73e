// The multi-adapter LoRA CUDA kernels (BGMV for decode rows, SGMV for prefill segments) against
// the CPU reference (kernels/lora_bgmv.cpp), fp32 and bf16, adapters of different ranks, rows
// without an adapter, Llama-3-8B projection shapes and odd ones. Needs a CUDA device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "kernels/bfloat16.h"
#include "kernels/lora_bgmv.h"
#include "tests/gpu/float_values.h"
#include "tests/gpu/gpu_buffer.h"

namespace lorad::kernels {
namespace {

using gpu_test::GpuBuffer;
using gpu_test::ValueAt;

// Values of one element type: fp32 as is, bf16 already rounded (so the host copy as fp32 holds
// exactly what the device reads).
struct Values {
  std::vector<float> f;
  std::vector<char> bytes;
};

Values MakeValues(size_t n, FloatKind kind, float stddev, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, stddev);
  Values v;
  v.f.resize(n);
  v.bytes.resize(n * FloatKindSize(kind));
  for (size_t i = 0; i < n; ++i) {
    float x = normal(rng);
    if (kind == FloatKind::kBF16) {
      const uint16_t h = float_to_bf16(x);
      x = bf16_to_float(h);
      std::memcpy(&v.bytes[2 * i], &h, 2);
    } else {
      std::memcpy(&v.bytes[4 * i], &x, 4);
    }
    v.f[i] = x;
  }
  return v;
}

// Adapters on the host (for the reference) and on the device (pointer arrays in device memory).
struct AdapterSet {
  std::vector<Values> a, b;
  std::vector<std::vector<float>> a_abs, b_abs;
  std::vector<const void*> a_host, b_host, a_abs_ptr, b_abs_ptr;
  std::vector<int32_t> rank;
  std::vector<float> scale;
  std::vector<std::unique_ptr<GpuBuffer<char>>> storage;
  std::unique_ptr<GpuBuffer<const void*>> a_dev, b_dev;
  std::unique_ptr<GpuBuffer<int32_t>> rank_dev;
  std::unique_ptr<GpuBuffer<float>> scale_dev;
  int32_t max_rank = 0;

  LoraAdapterTable Host() const {
    return {
        a_host.data(), b_host.data(), rank.data(), scale.data(), static_cast<int32_t>(rank.size()),
        max_rank};
  }
  LoraAdapterTable HostAbs() const {  // |A|, |B|, |scale| in fp32: the error scale
    return {a_abs_ptr.data(),
            b_abs_ptr.data(),
            rank.data(),
            scale.data(),
            static_cast<int32_t>(rank.size()),
            max_rank};
  }
  LoraAdapterTable Device() const {
    return {a_dev->get(),
            b_dev->get(),
            rank_dev->get(),
            scale_dev->get(),
            static_cast<int32_t>(rank.size()),
            max_rank};
  }
};

std::unique_ptr<AdapterSet> MakeAdapters(const std::vector<int32_t>& ranks, int64_t in, int64_t out,
                                         FloatKind kind, std::mt19937& rng) {
  auto set = std::make_unique<AdapterSet>();
  std::vector<const void*> a_dev, b_dev;
  for (const int32_t r : ranks) {
    set->a.push_back(MakeValues(r * in, kind, 1.f / std::sqrt(float(in)), rng));
    set->b.push_back(MakeValues(out * r, kind, 0.05f, rng));
    set->rank.push_back(r);
    // alpha = 2r at r = 16; 0 for a slot of rank 0, as the engine's stack gives it.
    set->scale.push_back(r > 0 ? 2.f * 16.f / r : 0.f);
    set->max_rank = std::max(set->max_rank, r);
  }
  for (size_t s = 0; s < ranks.size(); ++s) {
    set->a_host.push_back(set->a[s].bytes.data());
    set->b_host.push_back(set->b[s].bytes.data());
    auto abs = [](const std::vector<float>& v) {
      std::vector<float> r(v.size());
      for (size_t i = 0; i < v.size(); ++i) r[i] = std::fabs(v[i]);
      return r;
    };
    set->a_abs.push_back(abs(set->a[s].f));
    set->b_abs.push_back(abs(set->b[s].f));
    if (ranks[s] == 0) {  // null pointers, as the engine's stack gives a slot that is not there
      a_dev.push_back(nullptr);
      b_dev.push_back(nullptr);
      continue;
    }
    set->storage.push_back(std::make_unique<GpuBuffer<char>>(set->a[s].bytes));
    a_dev.push_back(set->storage.back()->get());
    set->storage.push_back(std::make_unique<GpuBuffer<char>>(set->b[s].bytes));
    b_dev.push_back(set->storage.back()->get());
  }
  for (size_t s = 0; s < ranks.size(); ++s) {
    set->a_abs_ptr.push_back(set->a_abs[s].data());
    set->b_abs_ptr.push_back(set->b_abs[s].data());
  }
  set->a_dev = std::make_unique<GpuBuffer<const void*>>(a_dev);
  set->b_dev = std::make_unique<GpuBuffer<const void*>>(b_dev);
  set->rank_dev = std::make_unique<GpuBuffer<int32_t>>(set->rank);
  set->scale_dev = std::make_unique<GpuBuffer<float>>(set->scale);
  return set;
}

// Runs the GPU launcher `gpu` (which writes y_dev in place) and the CPU reference `cpu` (on the
// host bytes), then compares. Tolerance: the kernels sum the in_features products of A x and the
// rank products of B t in other orders than the reference; as a random walk that is about
// sqrt(K) * u * (sum of |terms|) with K = in + rank, u = 2^-24; 8 times that, where the sum of
// |terms| is the reference itself run on |x|, |A|, |B|, |y|. bf16 adds one unit in the last place
// of the rounded output (at most 2^-7 of the value). Rows without an adapter must be untouched bit
// for bit.
template <typename Gpu, typename Cpu>
void RunAndCompare(FloatKind kind, int64_t rows, int64_t in, int64_t out, const AdapterSet& set,
                   const std::vector<int32_t>& row_adapter, std::mt19937& rng, Gpu gpu, Cpu cpu) {
  const Values x = MakeValues(rows * in, kind, 1.f, rng);
  const Values y = MakeValues(rows * out, kind, 1.f, rng);
  GpuBuffer<char> x_dev(x.bytes), y_dev(y.bytes);
  GpuBuffer<char> scratch(lora_scratch_bytes(rows, in, set.max_rank));
  LORAD_ASSERT_LAUNCH(gpu(x_dev.get(), y_dev.get(), scratch.get()));
  const std::vector<char> got = y_dev.Read();

  std::vector<char> want = y.bytes;
  cpu(x.bytes.data(), kind, set.Host(), want.data());
  std::vector<float> x_abs(x.f.size()), mag(y.f.size());
  for (size_t i = 0; i < x.f.size(); ++i) x_abs[i] = std::fabs(x.f[i]);
  for (size_t i = 0; i < y.f.size(); ++i) mag[i] = std::fabs(y.f[i]);
  cpu(x_abs.data(), FloatKind::kF32, set.HostAbs(), mag.data());

  const double walk = 8.0 * std::sqrt(double(in + set.max_rank)) * std::ldexp(1.0, -24);
  const double ulp = kind == FloatKind::kBF16 ? std::ldexp(1.0, -7) : 0.0;
  int64_t bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t s = row_adapter[r];
    const bool none = s < 0 || s >= static_cast<int32_t>(set.rank.size());
    for (int64_t o = 0; o < out; ++o) {
      const size_t i = r * out + o;
      const float g = ValueAt(got, kind, i), w = ValueAt(want, kind, i);
      const bool ok = none
                          ? std::memcmp(&got[i * FloatKindSize(kind)],
                                        &y.bytes[i * FloatKindSize(kind)], FloatKindSize(kind)) == 0
                          : std::fabs(g - w) <= walk * mag[i] + ulp * std::fabs(w);
      if (!ok && ++bad <= 5) {
        ADD_FAILURE() << "row " << r << " (adapter " << s << ") o " << o << ": gpu " << g << " cpu "
                      << w << " mag " << mag[i];
      }
    }
  }
  EXPECT_EQ(bad, 0) << "rows " << rows << " in " << in << " out " << out;
}

struct Shape {
  int64_t rows, in, out;
};

class LoraGpu : public ::testing::TestWithParam<FloatKind> {};

// BGMV against the reference at each shape, with adapters of ranks `ranks` and rows on every slot,
// none and an out-of-range one.
void CheckBgmv(FloatKind kind, const std::vector<Shape>& shapes, const std::vector<int32_t>& ranks,
               std::mt19937& rng) {
  for (const Shape& sh : shapes) {
    const auto set = MakeAdapters(ranks, sh.in, sh.out, kind, rng);
    std::vector<int32_t> index(sh.rows);
    const auto slots = static_cast<uint32_t>(ranks.size()) + 2;  // -1 .. ranks.size(): out of range
    for (auto& s : index) s = static_cast<int32_t>(rng() % slots) - 1;
    if (sh.rows >= 8) index[1] = index[2] = index[3] = 2;  // a run of one adapter in a tile
    GpuBuffer<int32_t> index_dev(index);
    RunAndCompare(
        kind, sh.rows, sh.in, sh.out, *set, index, rng,
        [&](const void* x, void* y, void* scratch) {
          return lora_bgmv_cuda(x, kind, sh.rows, sh.in, index_dev.get(), set->Device(), sh.out, y,
                                scratch, nullptr);
        },
        [&](const void* x, FloatKind k, const LoraAdapterTable& t, void* y) {
          lora_bgmv_cpu(x, k, sh.rows, sh.in, index.data(), t, sh.out, y);
        });
  }
}

TEST_P(LoraGpu, BgmvMatchesTheCpuReference) {
  std::mt19937 rng(21);
  // Decode batches at Llama-3-8B shapes (q: 4096 -> 4096, gate: 4096 -> 14336, down:
  // 14336 -> 4096, k: 4096 -> 1024) and odd sizes; ranks 8, 16, 64 and an odd 7. The expand sums
  // t from 16 chunks of partial sums at a time: 17000 gives 34 chunks (two full groups and a part).
  CheckBgmv(GetParam(),
            {Shape{1, 4096, 4096}, Shape{32, 4096, 14336}, Shape{13, 14336, 4096},
             Shape{64, 4096, 1024}, Shape{5, 77, 45}, Shape{3, 1, 1}, Shape{9, 17000, 40}},
            {8, 16, 64, 7}, rng);
}

// The other models lorad serves (README): in_features 576, 896 and 960 (one full 512-wide shrink
// chunk and a partial one), k/v outputs of 128-320 columns (one expand block, partly idle), and the
// intermediate sizes 1536-11008; ranks 8, 16, 32, 64 and an odd 7, plus one of 128 (above 64: the
// expand's unvectorized dot product, the shrink's loop over more rank rows than two a warp).
TEST_P(LoraGpu, BgmvAtOtherModelShapes) {
  std::mt19937 rng(25);
  CheckBgmv(GetParam(),
            {Shape{1, 576, 576}, Shape{8, 576, 192}, Shape{32, 576, 1536},  // SmolLM-135M
             Shape{13, 1536, 576},                                          //   down
             Shape{1, 960, 960}, Shape{5, 960, 320}, Shape{32, 960, 2560},  // SmolLM-360M
             Shape{9, 2560, 960},                                           //   down
             Shape{1, 896, 896}, Shape{32, 896, 128}, Shape{8, 896, 4864},  // Qwen2-0.5B
             Shape{13, 4864, 896},                                          //   down
             Shape{1, 1536, 256}, Shape{32, 8960, 1536},                    // Qwen2-1.5B
             Shape{3, 2048, 256}, Shape{32, 5632, 2048},                    // TinyLlama
             Shape{4, 11008, 4096}},                                        // Llama-2-7B down
            {8, 16, 32, 64, 7}, rng);
  CheckBgmv(GetParam(), {Shape{8, 576, 192}, Shape{13, 896, 4864}}, {128, 16}, rng);
}

// Adapters at their own ranks side by side, one of them rank 0 with null pointers: the engine's
// stack shares each adapter's own tensors (no padding to the largest rank) and gives a slot
// whose adapter does not target the projection rank 0; its rows keep y as it is.
TEST_P(LoraGpu, BgmvWithASlotOfRankZero) {
  std::mt19937 rng(26);
  CheckBgmv(GetParam(), {Shape{8, 4096, 1024}, Shape{13, 14336, 4096}, Shape{32, 576, 1536}},
            {16, 0, 8, 128}, rng);
}

TEST_P(LoraGpu, SgmvMatchesTheCpuReference) {
  const FloatKind kind = GetParam();
  std::mt19937 rng(22);
  // Prefill: segments of many lengths (an empty one, ones not a multiple of the 8-row tile) and a
  // segment without an adapter.
  const std::vector<int64_t> starts = {0, 300, 300, 301, 517, 540, 600};
  const std::vector<int32_t> segment_adapter = {0, 3, 1, -1, 2, 0};
  const int64_t rows = starts.back();
  std::vector<int32_t> per_row;
  for (size_t g = 0; g + 1 < starts.size(); ++g) {
    for (int64_t r = starts[g]; r < starts[g + 1]; ++r) per_row.push_back(segment_adapter[g]);
  }
  for (const auto& [in, out] : {std::pair<int64_t, int64_t>{4096, 1024}, {1000, 333}}) {
    const auto set = MakeAdapters({16, 8, 64, 5}, in, out, kind, rng);
    GpuBuffer<int64_t> starts_dev(starts);
    GpuBuffer<int32_t> adapter_dev(segment_adapter);
    const int64_t segments = static_cast<int64_t>(segment_adapter.size());
    RunAndCompare(
        kind, rows, in, out, *set, per_row, rng,
        [&](const void* x, void* y, void* scratch) {
          return lora_sgmv_cuda(x, kind, rows, in, starts_dev.get(), adapter_dev.get(), segments,
                                set->Device(), out, y, scratch, nullptr);
        },
        [&](const void* x, FloatKind k, const LoraAdapterTable& t, void* y) {
          lora_sgmv_cpu(x, k, in, starts.data(), segment_adapter.data(), segments, t, out, y);
        });
  }
}

// A group launch (q, k, v of one layer: one x, three outputs) must give bit for bit what one
// launch per target gives (that one is checked against the CPU reference above), with targets of
// different widths and adapters of different ranks, and leave rows without an adapter untouched.
// sh.out unused: the targets' widths are `outs`.
void CheckGroupEqualsOneLaunchPerTarget(FloatKind kind, const Shape& sh,
                                        const std::vector<int64_t>& outs, std::mt19937& rng) {
  std::vector<std::unique_ptr<AdapterSet>> sets;
  for (const int64_t out : outs) sets.push_back(MakeAdapters({16, 8, 64}, sh.in, out, kind, rng));
  std::vector<int32_t> index(sh.rows);
  for (auto& s : index) s = static_cast<int32_t>(rng() % 5) - 1;  // -1..3: 3 is out of range
  index[0] = 0;
  GpuBuffer<int32_t> index_dev(index);
  const Values x = MakeValues(sh.rows * sh.in, kind, 1.f, rng);
  GpuBuffer<char> x_dev(x.bytes);
  std::vector<Values> ys;
  std::vector<std::unique_ptr<GpuBuffer<char>>> group_y, single_y;
  std::vector<LoraTarget> targets;
  int64_t total_rank = 0;
  for (size_t i = 0; i < outs.size(); ++i) {
    ys.push_back(MakeValues(sh.rows * outs[i], kind, 1.f, rng));
    group_y.push_back(std::make_unique<GpuBuffer<char>>(ys.back().bytes));
    single_y.push_back(std::make_unique<GpuBuffer<char>>(ys.back().bytes));
    targets.push_back({sets[i]->Device(), outs[i], group_y.back()->get()});
    total_rank += sets[i]->max_rank;
  }
  GpuBuffer<char> scratch(lora_scratch_bytes(sh.rows, sh.in, total_rank));
  LORAD_ASSERT_LAUNCH(lora_bgmv_group_cuda(x_dev.get(), kind, sh.rows, sh.in, index_dev.get(),
                                           targets.data(), static_cast<int>(targets.size()),
                                           scratch.get(), nullptr));
  for (size_t i = 0; i < outs.size(); ++i) {
    LORAD_ASSERT_LAUNCH(lora_bgmv_cuda(x_dev.get(), kind, sh.rows, sh.in, index_dev.get(),
                                       sets[i]->Device(), outs[i], single_y[i]->get(),
                                       scratch.get(), nullptr));
    const std::vector<char> group = group_y[i]->Read(), single = single_y[i]->Read();
    EXPECT_EQ(group, single) << "target " << i << " (out " << outs[i] << "), rows " << sh.rows;
    EXPECT_NE(single, ys[i].bytes) << "target " << i << ": no row took an adapter";
  }
}

TEST_P(LoraGpu, GroupEqualsOneLaunchPerTarget) {
  std::mt19937 rng(23);
  for (const Shape& sh : {Shape{1, 4096, 0}, Shape{13, 4096, 0}, Shape{32, 1000, 0}}) {
    CheckGroupEqualsOneLaunchPerTarget(GetParam(), sh, {sh.in, 1024, 333}, rng);
  }
}

// q, k, v groups (and gate, up) of the other models: SmolLM-135M (576 -> 576, 192, 192),
// SmolLM-360M (960 -> 960, 320, 320), Qwen2-0.5B (896 -> 896, 128, 128; gate/up 4864),
// Qwen2-1.5B (1536 -> 1536, 256, 256), TinyLlama (2048 -> 2048, 256, 256; gate/up 5632).
TEST_P(LoraGpu, GroupAtOtherModelShapes) {
  std::mt19937 rng(26);
  for (const int64_t rows : {1, 13, 32}) {
    CheckGroupEqualsOneLaunchPerTarget(GetParam(), Shape{rows, 576, 0}, {576, 192, 192}, rng);
    CheckGroupEqualsOneLaunchPerTarget(GetParam(), Shape{rows, 960, 0}, {960, 320, 320}, rng);
    CheckGroupEqualsOneLaunchPerTarget(GetParam(), Shape{rows, 896, 0}, {896, 128, 128}, rng);
    CheckGroupEqualsOneLaunchPerTarget(GetParam(), Shape{rows, 896, 0}, {4864, 4864}, rng);
    CheckGroupEqualsOneLaunchPerTarget(GetParam(), Shape{rows, 1536, 0}, {1536, 256, 256}, rng);
    CheckGroupEqualsOneLaunchPerTarget(GetParam(), Shape{rows, 2048, 0}, {5632, 5632}, rng);
  }
}

// A row's delta must be the same bits in any batch, so a request decodes the same alone or beside
// others (the expand takes rows in tiles of 8; the shrink a row per block): the rows of a 13-row
// batch against the same rows in batches of 1, 3, 8 and 1, at the 8B shapes and odd ones.
TEST_P(LoraGpu, SmallBatchesGiveTheBitsOfALargeOne) {
  const FloatKind kind = GetParam();
  const size_t size = FloatKindSize(kind);
  std::mt19937 rng(24);
  const int64_t rows = 13;
  for (const auto& [in, out] : {std::pair<int64_t, int64_t>{4096, 4096},
                                {14336, 4096},
                                {4096, 14336},
                                {77, 45},
                                {17000, 40}}) {
    for (const std::vector<int32_t>& ranks :
         {std::vector<int32_t>{16, 8, 7, 32}, std::vector<int32_t>{64, 16}}) {
      const auto set = MakeAdapters(ranks, in, out, kind, rng);
      std::vector<int32_t> index(rows);
      for (auto& s : index) s = static_cast<int32_t>(rng() % (ranks.size() + 2)) - 1;
      index[0] = 0;
      GpuBuffer<int32_t> index_dev(index);
      const Values x = MakeValues(rows * in, kind, 1.f, rng);
      const Values y = MakeValues(rows * out, kind, 1.f, rng);
      GpuBuffer<char> x_dev(x.bytes), large_y(y.bytes), small_y(y.bytes);
      GpuBuffer<char> scratch(lora_scratch_bytes(rows, in, set->max_rank));
      LORAD_ASSERT_LAUNCH(lora_bgmv_cuda(x_dev.get(), kind, rows, in, index_dev.get(),
                                         set->Device(), out, large_y.get(), scratch.get(),
                                         nullptr));
      for (const auto& [begin, n] : {std::pair<int64_t, int64_t>{0, 1}, {1, 3}, {4, 8}, {12, 1}}) {
        LORAD_ASSERT_LAUNCH(lora_bgmv_cuda(
            x_dev.get() + begin * in * size, kind, n, in, index_dev.get() + begin, set->Device(),
            out, small_y.get() + begin * out * size, scratch.get(), nullptr));
      }
      const std::vector<char> large = large_y.Read(), small = small_y.Read();
      EXPECT_NE(large, y.bytes) << "no row took an adapter";
      for (int64_t r = 0; r < rows; ++r) {
        EXPECT_TRUE(std::equal(small.begin() + r * out * size, small.begin() + (r + 1) * out * size,
                               large.begin() + r * out * size))
            << "row " << r << " (adapter " << index[r] << "), in " << in << " out " << out
            << ", ranks up to " << set->max_rank;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, LoraGpu, ::testing::Values(FloatKind::kF32, FloatKind::kBF16));

}  // namespace
}  // namespace lorad::kernels
