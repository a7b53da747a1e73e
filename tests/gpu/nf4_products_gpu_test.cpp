// The 4-bit decode products against their CPU references at Llama-3-8B shapes and odd ones, with
// the weights' absmax double-quantized as bitsandbytes stores it: the GEMV kernel
// (kernels/nf4_gemv.cpp) for fp32, bf16 and fp16 activations and 1..8 rows, the tensor-core
// kernel (kernels/nf4_mma.cpp) for bf16 and fp16 and 1..32 rows. Needs a CUDA device.
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/bfloat16.h"
#include "kernels/dynamic_quant8.h"
#include "kernels/nf4_gemv.h"
#include "kernels/nf4_mma.h"
#include "tests/gpu/gpu_buffer.h"

namespace lorad::kernels {
namespace {

using gpu_test::GpuBuffer;

// An NF4 weight [out, in] with double-quantized absmax, on the host and the device.
struct Nf4Weight {
  int64_t out = 0, in = 0;
  std::vector<uint8_t> packed, qabsmax;
  std::vector<float> absmax2, absmax;  // absmax: the double-quantized values rebuilt (CPU)
  float offset = 0.f;
};

Nf4Weight MakeWeight(int64_t out, int64_t in, uint32_t seed) {
  Nf4Weight w;
  w.out = out;
  w.in = in;
  const int64_t n = out * in, blocks = Nf4Blocks(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 0.02f);
  std::vector<float> dense(n);
  for (auto& v : dense) v = normal(rng);
  w.packed.resize(Nf4PackedBytes(n));
  std::vector<float> absmax(blocks);
  nf4_quantize_cpu(dense.data(), n, w.packed.data(), absmax.data());
  double sum = 0;
  for (float a : absmax) sum += a;
  w.offset = static_cast<float>(sum / blocks);
  w.qabsmax.resize(blocks);
  w.absmax2.resize((blocks + 255) / 256);
  w.absmax.resize(blocks);
  dynamic_quant8_quantize_cpu(absmax.data(), blocks, w.offset, kDynamicQuant8BlockSize,
                              kDynamicMapSigned, w.qabsmax.data(), w.absmax2.data());
  dynamic_quant8_dequantize_cpu(w.qabsmax.data(), w.absmax2.data(), kDynamicMapSigned, blocks,
                                kDynamicQuant8BlockSize, w.offset, w.absmax.data());
  return w;
}

// x rounded to `kind` (values as fp32 for the reference, raw bytes for the device).
std::vector<char> Encode(std::vector<float>& x, FloatKind kind) {
  std::vector<char> bytes(x.size() * FloatKindSize(kind));
  for (size_t i = 0; i < x.size(); ++i) {
    if (kind == FloatKind::kF32) {
      std::memcpy(&bytes[4 * i], &x[i], 4);
    } else if (kind == FloatKind::kBF16) {
      const uint16_t h = float_to_bf16(x[i]);
      x[i] = bf16_to_float(h);
      std::memcpy(&bytes[2 * i], &h, 2);
    } else {
      const __half h = __float2half_rn(x[i]);
      x[i] = __half2float(h);
      std::memcpy(&bytes[2 * i], &h, 2);
    }
  }
  return bytes;
}

float Decode(const std::vector<char>& bytes, FloatKind kind, size_t i) {
  if (kind == FloatKind::kF32) {
    float v;
    std::memcpy(&v, &bytes[4 * i], 4);
    return v;
  }
  uint16_t h;
  std::memcpy(&h, &bytes[2 * i], 2);
  if (kind == FloatKind::kBF16) return bf16_to_float(h);
  __half_raw raw;
  raw.x = h;
  return __half2float(__half(raw));
}

// mag[r * out + o] = |x| . |W| row by row (the dequantized weight, as the reference builds it):
// the scale of the rounding errors a sum of these products may carry.
std::vector<float> Magnitudes(const Nf4Weight& w, const std::vector<float>& x, int64_t rows) {
  std::vector<float> mag(rows * w.out), wrow(w.in), xabs(x.size());
  for (size_t i = 0; i < x.size(); ++i) xabs[i] = std::fabs(x[i]);
  for (int64_t o = 0; o < w.out; ++o) {
    for (int64_t k = 0; k < w.in; ++k) {
      const int64_t i = o * w.in + k;
      const uint8_t q = i % 2 == 0 ? w.packed[i / 2] >> 4 : w.packed[i / 2] & 0xF;
      wrow[k] = std::fabs(kNf4Code[q] * w.absmax[i / kNf4BlockSize]);
    }
    for (int64_t r = 0; r < rows; ++r) {
      double m = 0;
      for (int64_t k = 0; k < w.in; ++k) m += double(wrow[k]) * xabs[r * w.in + k];
      mag[r * w.out + o] = static_cast<float>(m);
    }
  }
  return mag;
}

// A kernel variant under test: launches y = x W^T on the device, returns nullptr or the error.
using Launch = std::function<const char*(const void* x, FloatKind kind, int64_t rows,
                                         const Nf4Absmax& absmax, const uint8_t* packed, void* y)>;
// The CPU reference for x of `kind`: y fp32.
using Reference = std::function<void(const std::vector<float>& x, int64_t rows, FloatKind kind,
                                     std::vector<float>& y)>;

void CheckAgainstReference(const Nf4Weight& w, const std::vector<int64_t>& row_counts,
                           uint32_t seed, const std::vector<FloatKind>& kinds,
                           const Reference& reference,
                           const std::vector<std::pair<std::string, Launch>>& variants) {
  GpuBuffer<uint8_t> packed(w.packed), qabsmax(w.qabsmax);
  GpuBuffer<float> absmax2(w.absmax2);
  GpuBuffer<float> code(std::vector<float>(kDynamicMapSigned, kDynamicMapSigned + 256));
  const Nf4Absmax device_absmax{qabsmax.get(), absmax2.get(), code.get(), w.offset};
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (const FloatKind kind : kinds) {
    for (const int64_t rows : row_counts) {
      std::vector<float> x(rows * w.in);
      for (auto& v : x) v = normal(rng);
      const std::vector<char> x_bytes = Encode(x, kind);
      std::vector<float> ref(rows * w.out);
      reference(x, rows, kind, ref);
      const std::vector<float> mag = Magnitudes(w, x, rows);
      GpuBuffer<char> x_d(x_bytes);
      // Tolerance: both sides sum the same in_features fp32 products in different orders (the
      // kernel per 32-element chunk, scaled by the block's absmax, then across lanes). Rounding
      // errors of such sums behave like a random walk: about sqrt(K) * u * sum|w x| (u = 2^-24);
      // 8 times that covers both sums with a wide margin. A single wrong weight (wrong nibble,
      // wrong block scale) moves y by about sum|w x| / K, which for K >= 64 is above the
      // tolerance, so indexing bugs still fail. bf16/fp16 outputs may round to the neighbouring
      // value: one unit in the last place, at most 2^-7 (bf16) or 2^-10 (fp16) of the value.
      const double walk = 8.0 * std::sqrt(double(w.in)) * std::ldexp(1.0, -24);
      const double ulp = kind == FloatKind::kBF16  ? std::ldexp(1.0, -7)
                         : kind == FloatKind::kF16 ? std::ldexp(1.0, -10)
                                                   : 0.0;
      for (const auto& [name, launch] : variants) {
        GpuBuffer<char> y_d(rows * w.out * FloatKindSize(kind));  // poisoned: NaN
        LORAD_ASSERT_LAUNCH(launch(x_d.get(), kind, rows, device_absmax, packed.get(), y_d.get()));
        const std::vector<char> y = y_d.Read();
        int64_t bad = 0;
        for (int64_t i = 0; i < rows * w.out; ++i) {
          const float got = Decode(y, kind, i);
          const double tol = walk * mag[i] + ulp * std::fabs(ref[i]) + 1e-30;
          if (!(std::fabs(got - ref[i]) <= tol) && ++bad <= 5) {
            ADD_FAILURE() << name << ": out " << w.out << " in " << w.in << " rows " << rows
                          << " kind " << static_cast<int>(kind) << " index " << i << ": gpu " << got
                          << " cpu " << ref[i] << " tol " << tol;
          }
        }
        EXPECT_EQ(bad, 0) << name << ": out " << w.out << " in " << w.in << " rows " << rows;
      }
    }
  }
}

void CheckGemv(const Nf4Weight& w, const std::vector<int64_t>& row_counts, uint32_t seed) {
  const Reference reference = [&](const std::vector<float>& x, int64_t rows, FloatKind,
                                  std::vector<float>& y) {
    nf4_gemv_cpu(x.data(), rows, w.packed.data(), w.absmax.data(), w.out, w.in, y.data());
  };
  std::vector<std::pair<std::string, Launch>> variants;
  variants.emplace_back("nf4_gemv_cuda", [&](const void* x, FloatKind kind, int64_t rows,
                                             const Nf4Absmax& a, const uint8_t* p, void* y) {
    return nf4_gemv_cuda(x, kind, rows, p, a, w.out, w.in, y, nullptr);
  });
  variants.emplace_back(
      "nf4_gemv_cuda_overlapped", [&](const void* x, FloatKind kind, int64_t rows,
                                      const Nf4Absmax& a, const uint8_t* p, void* y) {
        return nf4_gemv_cuda_overlapped(x, kind, rows, p, a, w.out, w.in, y, nullptr);
      });
  for (const int rows_per_warp : {1, 2, 4}) {
    variants.emplace_back("rows/warp " + std::to_string(rows_per_warp),
                          [&w, rows_per_warp](const void* x, FloatKind kind, int64_t rows,
                                              const Nf4Absmax& a, const uint8_t* p, void* y) {
                            return nf4_gemv_cuda_rows_per_warp(rows_per_warp, x, kind, rows, p, a,
                                                               w.out, w.in, y, nullptr);
                          });
  }
  CheckAgainstReference(w, row_counts, seed, {FloatKind::kF32, FloatKind::kBF16, FloatKind::kF16},
                        reference, variants);
}

// The tensor-core kernel against its reference (the code book rounded to x's type), with the
// planner's split of the reduction axis, every split the shape allows, programmatic launch, and
// as one weight of a grouped launch.
void CheckMma(const Nf4Weight& w, const std::vector<int64_t>& row_counts, uint32_t seed) {
  const Reference reference = [&](const std::vector<float>& x, int64_t rows, FloatKind kind,
                                  std::vector<float>& y) {
    nf4_mma_cpu(x.data(), rows, w.packed.data(), w.absmax.data(), w.out, w.in, kind, y.data());
  };
  std::vector<std::pair<std::string, Launch>> variants;
  variants.emplace_back("nf4_mma_cuda", [&](const void* x, FloatKind kind, int64_t rows,
                                            const Nf4Absmax& a, const uint8_t* p, void* y) {
    return nf4_mma_cuda(x, kind, rows, p, a, w.out, w.in, y, nullptr, false);
  });
  variants.emplace_back(
      "nf4_mma_cuda overlapped",
      [&](const void* x, FloatKind kind, int64_t rows, const Nf4Absmax& a, const uint8_t* p,
          void* y) { return nf4_mma_cuda(x, kind, rows, p, a, w.out, w.in, y, nullptr, true); });
  // Other grids: one block (ranges of up to the shared memory's limit, in rounds), and 3, 7 and
  // 50 blocks, whose ranges split the tiles unevenly and whose warps' shares cross tile ends.
  for (const int64_t blocks : {1, 3, 7, 50}) {
    variants.emplace_back("blocks " + std::to_string(blocks),
                          [&w, blocks](const void* x, FloatKind kind, int64_t rows,
                                       const Nf4Absmax& a, const uint8_t* p, void* y) {
                            return nf4_mma_cuda_blocks(blocks, x, kind, rows, p, a, w.out, w.in, y,
                                                       nullptr);
                          });
  }
  // Grouped launches: w first, second and last of three weights sharing x (the other two of 1000
  // and 40 rows: partial tiles, a weight smaller than a tile), each with its own absmax offset.
  const Nf4Weight others[2] = {MakeWeight(1000, w.in, seed + 1), MakeWeight(40, w.in, seed + 2)};
  std::vector<std::unique_ptr<GpuBuffer<uint8_t>>> other_bytes;
  std::vector<std::unique_ptr<GpuBuffer<float>>> other_floats;
  std::vector<std::unique_ptr<GpuBuffer<char>>> other_ys;
  Nf4MmaTarget other_targets[2];
  for (int i = 0; i < 2; ++i) {
    const Nf4Weight& o = others[i];
    other_bytes.push_back(std::make_unique<GpuBuffer<uint8_t>>(o.packed));
    other_bytes.push_back(std::make_unique<GpuBuffer<uint8_t>>(o.qabsmax));
    other_floats.push_back(std::make_unique<GpuBuffer<float>>(o.absmax2));
    other_floats.push_back(std::make_unique<GpuBuffer<float>>(
        std::vector<float>(kDynamicMapSigned, kDynamicMapSigned + 256)));
    other_ys.push_back(std::make_unique<GpuBuffer<char>>(kNf4MmaMaxRows * o.out * 2));
    other_targets[i].packed = other_bytes[2 * i]->get();
    other_targets[i].absmax = {other_bytes[2 * i + 1]->get(), other_floats[2 * i]->get(),
                               other_floats[2 * i + 1]->get(), o.offset};
    other_targets[i].out_features = o.out;
    other_targets[i].y = other_ys[i]->get();
  }
  for (int position = 0; position < 3; ++position) {
    variants.emplace_back(
        "group, weight " + std::to_string(position) + " of 3",
        [&w, &other_targets, position](const void* x, FloatKind kind, int64_t rows,
                                       const Nf4Absmax& a, const uint8_t* p, void* y) {
          Nf4MmaTarget targets[3];
          for (int i = 0, o = 0; i < 3; ++i) {
            if (i == position) {
              targets[i].packed = p;
              targets[i].absmax = a;
              targets[i].out_features = w.out;
              targets[i].y = y;
            } else {
              targets[i] = other_targets[o++];
            }
          }
          return nf4_mma_group_cuda(x, kind, rows, targets, 3, w.in, nullptr, true);
        });
  }
  CheckAgainstReference(w, row_counts, seed, {FloatKind::kBF16, FloatKind::kF16}, reference,
                        variants);
}

// Llama-3-8B: q/o (4096 x 4096), k/v (1024 x 4096), gate/up (14336 x 4096), down (4096 x 14336).
TEST(Nf4GemvGpu, LlamaShapesMatchTheCpuReference) {
  for (const auto& [out, in] :
       {std::pair<int64_t, int64_t>{4096, 4096}, {1024, 4096}, {14336, 4096}, {4096, 14336}}) {
    CheckGemv(MakeWeight(out, in, static_cast<uint32_t>(out + in)), {1, 3, 8}, 1);
  }
}

// Odd output counts (a warp's last rows missing, a partial CUDA block), short rows (fewer 16-byte
// chunks than a warp's lanes), and reductions split into parts of unequal length (in = 2112,
// 4160, 9280: 66, 130, 290 chunks), every row count.
TEST(Nf4GemvGpu, OddShapesMatchTheCpuReference) {
  for (const auto& [out, in] : {std::pair<int64_t, int64_t>{1, 64},
                                {7, 128},
                                {33, 192},
                                {4097, 320},
                                {9, 1088},
                                {130, 4160},
                                {3, 2112},
                                {21, 9280}}) {
    CheckGemv(MakeWeight(out, in, static_cast<uint32_t>(3 * out + in)), {1, 2, 3, 4, 5, 6, 7, 8},
              2);
  }
}

// The other models lorad serves (README), whose shapes no benchmark ran: hidden 576 (SmolLM-135M),
// 960 (SmolLM-360M) and 896 (Qwen2-0.5B) are multiples of 64 but not of 256, so every product
// whose in_features is the hidden size (q, k, v, o, gate, up) takes this GEMV kernel at every
// decode batch of up to 32 rows (engine/model/nf4_tensor.cpp, 8 rows a launch): fewer 16-byte
// chunks per row (18, 30, 28) than a warp has lanes, and k/v of only 128-320 rows. Also the
// reductions over in_features 1536, 4864, 5632 and 11008 (not powers of two).
TEST(Nf4GemvGpu, OtherModelShapesMatchTheCpuReference) {
  for (const auto& [out, in] : {std::pair<int64_t, int64_t>{576, 576},  // SmolLM-135M q, o
                                {192, 576},                             //   k, v (3 x 64)
                                {1536, 576},                            //   gate, up
                                {576, 1536},                            //   down
                                {960, 960},                             // SmolLM-360M q, o
                                {320, 960},                             //   k, v (5 x 64)
                                {2560, 960},                            //   gate, up
                                {896, 896},                             // Qwen2-0.5B q, o
                                {128, 896},                             //   k, v (2 x 64)
                                {4864, 896},                            //   gate, up
                                {896, 4864},                            //   down
                                {2048, 5632},                           // TinyLlama down
                                {256, 2048}}) {                         //   k, v (4 x 64)
    CheckGemv(MakeWeight(out, in, static_cast<uint32_t>(7 * out + in)), {1, 5, 8}, 6);
  }
  CheckGemv(MakeWeight(4096, 11008, 11008), {1, 8}, 7);  // Llama-2-7B down
}

TEST(Nf4GemvGpu, RejectsShapesItDoesNotHandle) {
  EXPECT_FALSE(nf4_gemv_cuda_supports(0, 4096));
  EXPECT_FALSE(nf4_gemv_cuda_supports(kNf4GemvMaxRows + 1, 4096));
  EXPECT_FALSE(nf4_gemv_cuda_supports(1, 4096 + 32));
  EXPECT_TRUE(nf4_gemv_cuda_supports(1, 64));
}

// A chain of overlapped launches (programmatic dependent launch) where each GEMV reads the
// previous one's output as x: every launch must wait for its predecessor before reading x.
TEST(Nf4GemvGpu, OverlappedChainReadsEachPredecessorsOutput) {
  const int64_t n = 4096;
  const Nf4Weight w = MakeWeight(n, n, 99);
  GpuBuffer<uint8_t> packed(w.packed), qabsmax(w.qabsmax);
  GpuBuffer<float> absmax2(w.absmax2);
  GpuBuffer<float> code(std::vector<float>(kDynamicMapSigned, kDynamicMapSigned + 256));
  const Nf4Absmax device_absmax{qabsmax.get(), absmax2.get(), code.get(), w.offset};
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x0(n);
  for (auto& v : x0) v = normal(rng);
  // The weight's scale (std 0.02, K = 4096: |y| ~ 1.3 |x|) keeps six steps finite.
  constexpr int kSteps = 6;
  GpuBuffer<float> b0(x0);
  std::vector<std::unique_ptr<GpuBuffer<float>>> outs;
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  const float* in = b0.get();
  for (int s = 0; s < kSteps; ++s) {
    outs.push_back(std::make_unique<GpuBuffer<float>>(n));
    ASSERT_EQ(nf4_gemv_cuda_overlapped(in, FloatKind::kF32, 1, packed.get(), device_absmax, n, n,
                                       outs.back()->get(), stream),
              nullptr);
    in = outs.back()->get();
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cudaStreamDestroy(stream);
  // Step by step: the device's own input (previous output) through the CPU reference; a launch
  // that read x early would have read NaN (the poisoned buffer) or stale values.
  std::vector<float> x = x0;
  for (int s = 0; s < kSteps; ++s) {
    std::vector<float> expect(n);
    nf4_gemv_cpu(x.data(), 1, w.packed.data(), w.absmax.data(), n, n, expect.data());
    const std::vector<float> got = outs[s]->Read();
    double err = 0, norm = 0;
    for (int64_t i = 0; i < n; ++i) {
      err += (double(got[i]) - expect[i]) * (double(got[i]) - expect[i]);
      norm += double(expect[i]) * expect[i];
    }
    EXPECT_LE(std::sqrt(err / norm), 1e-5) << "step " << s;
    x = got;
  }
}

// Llama-3-8B shapes, a decode batch's row counts (one, two and four 8-column tiles, partial ones).
TEST(Nf4MmaGpu, LlamaShapesMatchTheCpuReference) {
  for (const auto& [out, in] :
       {std::pair<int64_t, int64_t>{4096, 4096}, {1024, 4096}, {14336, 4096}, {4096, 14336}}) {
    CheckMma(MakeWeight(out, in, static_cast<uint32_t>(out + in)), {1, 8, 13, 32}, 3);
  }
}

// Output counts that leave a warp's 16- or 32-row tile or a CUDA block's tiles partly empty (4100
// rows: enough for two 16-row tiles per warp from 9 rows of x on, the last one 4 rows long), short
// rows (one pipeline stage), every row count from 1 to 32.
TEST(Nf4MmaGpu, OddShapesMatchTheCpuReference) {
  std::vector<int64_t> all_rows;
  for (int64_t r = 1; r <= kNf4MmaMaxRows; ++r) all_rows.push_back(r);
  for (const auto& [out, in] : {std::pair<int64_t, int64_t>{1, 256},
                                {7, 512},
                                {33, 768},
                                {130, 2048},
                                {1000, 256},
                                {4100, 512}}) {
    CheckMma(MakeWeight(out, in, static_cast<uint32_t>(5 * out + in)), all_rows, 4);
  }
}

// The other models' products that the tensor-core kernel takes (in_features a multiple of 256):
// reductions of 6, 10, 19, 22, 35 and 43 pipeline stages of 256 (1536, 2560, 4864, 5632, 8960,
// 11008: not powers of two, some odd), k/v of 256 rows (a block's tiles fewer than its warps),
// and outputs of 576, 896 and 960 rows (hidden sizes that are multiples of 64 but not of 256).
TEST(Nf4MmaGpu, OtherModelShapesMatchTheCpuReference) {
  for (const auto& [out, in] : {std::pair<int64_t, int64_t>{576, 1536},  // SmolLM-135M down
                                {960, 2560},                             // SmolLM-360M down
                                {896, 4864},                             // Qwen2-0.5B down
                                {256, 1536},                             // Qwen2-1.5B k, v
                                {256, 2048}}) {                          // TinyLlama k, v
    CheckMma(MakeWeight(out, in, static_cast<uint32_t>(9 * out + in)), {1, 8, 9, 13, 32}, 8);
  }
  for (const auto& [out, in] : {std::pair<int64_t, int64_t>{1536, 8960},  // Qwen2-1.5B down
                                {8960, 1536},                             //   gate, up
                                {2048, 5632},                             // TinyLlama down
                                {5632, 2048},                             //   gate, up
                                {4096, 11008}}) {                         // Llama-2-7B down
    CheckMma(MakeWeight(out, in, static_cast<uint32_t>(9 * out + in)), {1, 9, 32}, 9);
  }
}

// Which 4-bit kernel each supported model's decode products take (engine/model/nf4_tensor.cpp:
// MmaProducts and SiluMulProduct where nf4_mma_cuda_supports, else the GEMV kernel where
// nf4_gemv_cuda_supports, else dequantize + matmul): hidden 576, 896 and 960 are refused by the
// tensor-core launchers with an error (never a wrong result) and served by the GEMV kernel; every
// other in_features of the README's models is a multiple of 256.
TEST(Nf4MmaGpu, HiddenSizesNotAMultipleOf256FallBackToTheGemvKernel) {
  for (const int64_t in : {576, 896, 960}) {
    for (const int64_t rows : {1, 8, 9, 32}) {
      EXPECT_FALSE(nf4_mma_cuda_supports(rows, in, FloatKind::kBF16)) << in;
      EXPECT_TRUE(nf4_gemv_cuda_supports(std::min<int64_t>(rows, kNf4GemvMaxRows), in)) << in;
    }
    EXPECT_NE(nf4_mma_cuda(nullptr, FloatKind::kBF16, 1, nullptr, Nf4Absmax{}, in, in, nullptr,
                           nullptr, false),
              nullptr)
        << in;
    Nf4MmaTarget gate, up;
    gate.out_features = up.out_features = 4 * in;
    EXPECT_NE(
        nf4_mma_silu_mul_cuda(nullptr, FloatKind::kBF16, 1, gate, up, in, nullptr, nullptr, false),
        nullptr)
        << in;
  }
  for (const int64_t in : {1536, 2048, 2560, 4096, 4864, 5632, 8960, 11008, 14336}) {
    EXPECT_TRUE(nf4_mma_cuda_supports(1, in, FloatKind::kBF16)) << in;
    EXPECT_TRUE(nf4_mma_cuda_supports(kNf4MmaMaxRows, in, FloatKind::kBF16)) << in;
  }
}

TEST(Nf4MmaGpu, RejectsProblemsItDoesNotHandle) {
  EXPECT_FALSE(nf4_mma_cuda_supports(1, 4096, FloatKind::kF32));
  EXPECT_FALSE(nf4_mma_cuda_supports(0, 4096, FloatKind::kBF16));
  EXPECT_FALSE(nf4_mma_cuda_supports(kNf4MmaMaxRows + 1, 4096, FloatKind::kBF16));
  EXPECT_FALSE(nf4_mma_cuda_supports(1, 4096 + 64, FloatKind::kBF16));
  EXPECT_TRUE(nf4_mma_cuda_supports(32, 256, FloatKind::kF16));
  Nf4MmaTarget none[kNf4MmaMaxTargets + 1];
  EXPECT_NE(nf4_mma_group_cuda(nullptr, FloatKind::kBF16, 1, none, kNf4MmaMaxTargets + 1, 256,
                               nullptr, false),
            nullptr);
  EXPECT_NE(nf4_mma_group_cuda(nullptr, FloatKind::kBF16, 1, none, 0, 256, nullptr, false),
            nullptr);
  EXPECT_NE(nf4_mma_cuda_blocks(0, nullptr, FloatKind::kBF16, 1, nullptr, Nf4Absmax{}, 16, 768,
                                nullptr, nullptr),
            nullptr);
  // Rows and block numbers past 32 bits.
  EXPECT_NE(nf4_mma_cuda(nullptr, FloatKind::kBF16, 1, nullptr, Nf4Absmax{}, int64_t{1} << 26, 4096,
                         nullptr, nullptr, false),
            nullptr);
}

// The MLP's gate and up in one launch ending in silu(gate) * up, against nf4_mma_silu_mul_cpu,
// with the planner's grid, programmatic launch, and grids of 1, 3 and 7 blocks (ranges of several
// gate/up pairs, warps' shares crossing from one tile into the next). Tolerance: gate and up each
// within CheckAgainstReference's bound plus one bf16 unit (their rounding), carried through
// silu(g) * u (|silu'| <= 1.1), plus one unit for the silu's rounding and one for the output's.
void CheckSiluMul(int64_t out, int64_t in, const std::vector<int64_t>& row_counts,
                  const std::vector<int64_t>& grids, uint32_t seed) {
  const Nf4Weight gate = MakeWeight(out, in, seed), up = MakeWeight(out, in, seed + 1);
  GpuBuffer<float> code(std::vector<float>(kDynamicMapSigned, kDynamicMapSigned + 256));
  GpuBuffer<uint8_t> gate_packed(gate.packed), gate_q(gate.qabsmax), up_packed(up.packed),
      up_q(up.qabsmax);
  GpuBuffer<float> gate_a2(gate.absmax2), up_a2(up.absmax2);
  Nf4MmaTarget gate_t, up_t;
  gate_t.packed = gate_packed.get();
  gate_t.absmax = {gate_q.get(), gate_a2.get(), code.get(), gate.offset};
  gate_t.out_features = out;
  up_t.packed = up_packed.get();
  up_t.absmax = {up_q.get(), up_a2.get(), code.get(), up.offset};
  up_t.out_features = out;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const double walk = 8.0 * std::sqrt(double(in)) * std::ldexp(1.0, -24);
  const double ulp = std::ldexp(1.0, -7);
  for (const int64_t rows : row_counts) {
    std::vector<float> x(rows * in);
    for (auto& v : x) v = normal(rng);
    GpuBuffer<char> x_d(Encode(x, FloatKind::kBF16));
    std::vector<float> ref(rows * out), g(rows * out), u(rows * out);
    nf4_mma_silu_mul_cpu(x.data(), rows, gate.packed.data(), gate.absmax.data(), up.packed.data(),
                         up.absmax.data(), out, in, ref.data());
    nf4_mma_cpu(x.data(), rows, gate.packed.data(), gate.absmax.data(), out, in, FloatKind::kBF16,
                g.data());
    nf4_mma_cpu(x.data(), rows, up.packed.data(), up.absmax.data(), out, in, FloatKind::kBF16,
                u.data());
    const std::vector<float> gate_mag = Magnitudes(gate, x, rows), up_mag = Magnitudes(up, x, rows);
    for (const int64_t blocks : grids) {
      for (const bool overlapped : {false, true}) {
        GpuBuffer<char> y_d(rows * out * 2);  // poisoned: NaN
        LORAD_ASSERT_LAUNCH(nf4_mma_silu_mul_cuda(x_d.get(), FloatKind::kBF16, rows, gate_t, up_t,
                                                  in, y_d.get(), nullptr, overlapped, blocks));
        const std::vector<char> y = y_d.Read();
        int64_t bad = 0;
        for (int64_t i = 0; i < rows * out; ++i) {
          const double dg = walk * gate_mag[i] + ulp * std::fabs(g[i]);
          const double du = walk * up_mag[i] + ulp * std::fabs(u[i]);
          const double silu = std::fabs(g[i] / (1.0 + std::exp(-double(g[i]))));
          const double tol = 1.1 * (std::fabs(u[i]) + du) * dg + (1 + ulp) * silu * du +
                             ulp * silu * std::fabs(u[i]) + ulp * std::fabs(ref[i]) + 1e-30;
          const float got = Decode(y, FloatKind::kBF16, i);
          if (!(std::fabs(got - ref[i]) <= tol) && ++bad <= 5) {
            ADD_FAILURE() << "blocks " << blocks << " overlapped " << overlapped << ": out " << out
                          << " in " << in << " rows " << rows << " index " << i << ": gpu " << got
                          << " cpu " << ref[i] << " tol " << tol;
          }
        }
        EXPECT_EQ(bad, 0) << "blocks " << blocks << ": out " << out << " in " << in << " rows "
                          << rows;
      }
    }
  }
}

// Llama-3-8B's gate/up (14336 x 4096) and shapes whose last tile pair is partial or whose pairs
// are fewer than the blocks.
TEST(Nf4MmaGpu, SiluMulOfGateAndUpMatchesTheCpuReference) {
  CheckSiluMul(14336, 4096, {1, 32}, {0, 7}, 11);
  for (const auto& [out, in] :
       {std::pair<int64_t, int64_t>{1, 256}, {33, 768}, {130, 2048}, {1000, 256}}) {
    CheckSiluMul(out, in, {1, 8, 13, 32}, {0, 1, 3, 7}, static_cast<uint32_t>(out + in));
  }
}

// The fused MLP activation at the other models' gate/up shapes it serves: TinyLlama (5632 x
// 2048: 176 pairs of 32-row tiles) and Qwen2-1.5B (8960 x 1536: 6 stages a tile).
TEST(Nf4MmaGpu, SiluMulAtOtherModelShapes) {
  CheckSiluMul(5632, 2048, {1, 9, 32}, {0, 3}, 12);
  CheckSiluMul(8960, 1536, {1, 32}, {0}, 13);
}

TEST(Nf4MmaGpu, SiluMulRefusesWhatItDoesNotHandle) {
  Nf4MmaTarget gate, up;
  gate.out_features = 64;
  up.out_features = 48;
  EXPECT_NE(
      nf4_mma_silu_mul_cuda(nullptr, FloatKind::kBF16, 1, gate, up, 256, nullptr, nullptr, false),
      nullptr);  // gate and up differ in rows
  up.out_features = 64;
  EXPECT_NE(
      nf4_mma_silu_mul_cuda(nullptr, FloatKind::kF16, 1, gate, up, 256, nullptr, nullptr, false),
      nullptr);  // bf16 only
}

// The reference itself: the bf16 code book is the levels rounded as the host rounds bf16, and a
// product with it differs from nf4_gemv_cpu's by no more than that rounding.
TEST(Nf4MmaGpu, RoundedCodeBookIsTheLevelsInTheActivationType) {
  float bf16[16], f16[16], f32[16];
  nf4_code_rounded_to(FloatKind::kBF16, bf16);
  nf4_code_rounded_to(FloatKind::kF16, f16);
  nf4_code_rounded_to(FloatKind::kF32, f32);
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(bf16[i], bf16_to_float(float_to_bf16(kNf4Code[i]))) << i;
    EXPECT_EQ(f16[i], __half2float(__float2half_rn(kNf4Code[i]))) << i;
    EXPECT_EQ(f32[i], kNf4Code[i]) << i;
  }
}

}  // namespace
}  // namespace lorad::kernels
