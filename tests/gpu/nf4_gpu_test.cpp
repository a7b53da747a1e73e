// The NF4 CUDA kernels against the CPU reference (kernels/nf4.cpp, the specification): quantize
// gives the same packed codes and absmax bit for bit from fp32, bf16 and fp16 weights; dequantize
// gives the same fp32 values bit for bit (and those values rounded once for bf16/fp16), also with
// the double-quantized absmax rebuilt on the device. Needs a CUDA device.
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kernels/bfloat16.h"
#include "kernels/dynamic_quant8.h"
#include "kernels/nf4.h"
#include "tests/gpu/gpu_buffer.h"

namespace lorad::kernels {
namespace {

using gpu_test::GpuBuffer;

// Llama-shaped weights (normal, std 0.02) with the cases that break quantizers: an all-zero block,
// a block holding one large outlier, and values exactly at +-absmax.
std::vector<float> Weights(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 0.02f);
  std::vector<float> w(n);
  for (auto& v : w) v = normal(rng);
  for (int64_t i = 64; i < std::min<int64_t>(n, 128); ++i) w[i] = 0.f;
  if (n > 200) w[150] = 3.5f;
  if (n > 300) {
    w[260] = -0.5f;  // both ends of a block's range
    w[261] = 0.5f;
  }
  return w;
}

int64_t Mismatches(const void* a, const void* b, int64_t count, size_t size) {
  int64_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    bad += std::memcmp(static_cast<const char*>(a) + i * size,
                       static_cast<const char*>(b) + i * size, size) != 0;
  }
  return bad;
}

class Nf4QuantizeGpu : public ::testing::TestWithParam<std::tuple<int64_t, FloatKind>> {};

TEST_P(Nf4QuantizeGpu, SameCodesAndAbsmaxAsTheCpuReference) {
  const auto [n, kind] = GetParam();
  std::vector<float> w = Weights(n, static_cast<uint32_t>(n));
  GpuBuffer<char> input(n * FloatKindSize(kind));
  // The CPU quantizes the same numbers the GPU reads: bf16/fp16 values widened to fp32 (exact).
  if (kind == FloatKind::kF32) {
    ASSERT_EQ(cudaMemcpy(input.get(), w.data(), n * 4, cudaMemcpyHostToDevice), cudaSuccess);
  } else {
    std::vector<uint16_t> h(n);
    for (int64_t i = 0; i < n; ++i) {
      if (kind == FloatKind::kBF16) {
        h[i] = float_to_bf16(w[i]);
        w[i] = bf16_to_float(h[i]);
      } else {
        const __half v = __float2half_rn(w[i]);
        std::memcpy(&h[i], &v, 2);
        w[i] = __half2float(v);
      }
    }
    ASSERT_EQ(cudaMemcpy(input.get(), h.data(), n * 2, cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<uint8_t> packed(Nf4PackedBytes(n));
  std::vector<float> absmax(Nf4Blocks(n));
  nf4_quantize_cpu(w.data(), n, packed.data(), absmax.data());

  GpuBuffer<uint8_t> packed_d(packed.size());
  GpuBuffer<float> absmax_d(absmax.size());
  LORAD_ASSERT_LAUNCH(
      nf4_quantize_cuda(input.get(), kind, n, packed_d.get(), absmax_d.get(), nullptr));
  const auto packed_gpu = packed_d.Read();
  const auto absmax_gpu = absmax_d.Read();
  EXPECT_EQ(Mismatches(packed_gpu.data(), packed.data(), packed.size(), 1), 0) << "packed bytes";
  EXPECT_EQ(Mismatches(absmax_gpu.data(), absmax.data(), absmax.size(), 4), 0) << "absmax";
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, Nf4QuantizeGpu,
    ::testing::Combine(::testing::Values<int64_t>(1, 2, 63, 64, 65, 127, 1000001, 4096 * 4096,
                                                  14336 * 4096),
                       ::testing::Values(FloatKind::kF32, FloatKind::kBF16, FloatKind::kF16)));

class Nf4DequantizeGpu : public ::testing::TestWithParam<int64_t> {};

TEST_P(Nf4DequantizeGpu, SameValuesAsTheCpuReferenceInEveryOutputType) {
  const int64_t n = GetParam();
  const std::vector<float> w = Weights(n, 17 + static_cast<uint32_t>(n));
  std::vector<uint8_t> packed(Nf4PackedBytes(n));
  std::vector<float> absmax(Nf4Blocks(n)), ref(n);
  nf4_quantize_cpu(w.data(), n, packed.data(), absmax.data());
  nf4_dequantize_cpu(packed.data(), absmax.data(), n, ref.data());
  GpuBuffer<uint8_t> packed_d(packed);
  GpuBuffer<float> absmax_d(absmax);

  GpuBuffer<float> out32(n);
  LORAD_ASSERT_LAUNCH(nf4_dequantize_cuda(packed_d.get(), absmax_d.get(), n, out32.get(),
                                          FloatKind::kF32, nullptr));
  EXPECT_EQ(Mismatches(out32.Read().data(), ref.data(), n, 4), 0) << "fp32";

  GpuBuffer<uint16_t> out16(n);
  for (const FloatKind kind : {FloatKind::kBF16, FloatKind::kF16}) {
    LORAD_ASSERT_LAUNCH(
        nf4_dequantize_cuda(packed_d.get(), absmax_d.get(), n, out16.get(), kind, nullptr));
    std::vector<uint16_t> want(n);
    for (int64_t i = 0; i < n; ++i) {
      if (kind == FloatKind::kBF16) {
        want[i] = float_to_bf16(ref[i]);
      } else {
        const __half h = __float2half_rn(ref[i]);
        std::memcpy(&want[i], &h, 2);
      }
    }
    EXPECT_EQ(Mismatches(out16.Read().data(), want.data(), n, 2), 0)
        << (kind == FloatKind::kBF16 ? "bf16" : "fp16");
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, Nf4DequantizeGpu,
                         ::testing::Values<int64_t>(1, 63, 65, 1000001, 4096 * 4096));

// compress_statistics=True: the absmax is stored as 8-bit codes (blocks of 256, mean offset) and
// rebuilt on the device (dynamic_quant8_dequantize_cuda) before dequantizing the weights.
TEST(Nf4DoubleQuantGpu, DequantizeThroughTheDoubleQuantizedAbsmax) {
  for (const int64_t n : {int64_t{4096} * 4096, int64_t{1000001}, int64_t{77}}) {
    const std::vector<float> w = Weights(n, 99);
    std::vector<uint8_t> packed(Nf4PackedBytes(n));
    const int64_t blocks = Nf4Blocks(n);
    std::vector<float> absmax(blocks);
    nf4_quantize_cpu(w.data(), n, packed.data(), absmax.data());
    double sum = 0;
    for (float a : absmax) sum += a;
    const float offset = static_cast<float>(sum / blocks);
    std::vector<uint8_t> qabsmax(blocks);
    std::vector<float> absmax2((blocks + 255) / 256), absmax_dq(blocks), ref(n);
    dynamic_quant8_quantize_cpu(absmax.data(), blocks, offset, kDynamicQuant8BlockSize,
                                kDynamicMapSigned, qabsmax.data(), absmax2.data());
    dynamic_quant8_dequantize_cpu(qabsmax.data(), absmax2.data(), kDynamicMapSigned, blocks,
                                  kDynamicQuant8BlockSize, offset, absmax_dq.data());
    nf4_dequantize_cpu(packed.data(), absmax_dq.data(), n, ref.data());

    GpuBuffer<uint8_t> packed_d(packed), qabsmax_d(qabsmax);
    GpuBuffer<float> absmax2_d(absmax2),
        code_d(std::vector<float>(kDynamicMapSigned, kDynamicMapSigned + 256));
    GpuBuffer<float> absmax_dq_d(blocks), out(n);
    LORAD_ASSERT_LAUNCH(dynamic_quant8_dequantize_cuda(
        qabsmax_d.get(), absmax2_d.get(), code_d.get(), blocks, kDynamicQuant8BlockSize, offset,
        absmax_dq_d.get(), nullptr));
    EXPECT_EQ(Mismatches(absmax_dq_d.Read().data(), absmax_dq.data(), blocks, 4), 0) << n;
    LORAD_ASSERT_LAUNCH(nf4_dequantize_cuda(packed_d.get(), absmax_dq_d.get(), n, out.get(),
                                            FloatKind::kF32, nullptr));
    EXPECT_EQ(Mismatches(out.Read().data(), ref.data(), n, 4), 0) << n;

    // The fused kernel: the absmax rebuilt inside it, fp32 and bf16 out.
    Nf4Absmax fused;
    fused.qabsmax = qabsmax_d.get();
    fused.absmax2 = absmax2_d.get();
    fused.code2 = code_d.get();
    fused.offset = offset;
    GpuBuffer<float> out_fused(n);
    LORAD_ASSERT_LAUNCH(nf4_dequantize_double_cuda(packed_d.get(), fused, n, out_fused.get(),
                                                   FloatKind::kF32, nullptr));
    EXPECT_EQ(Mismatches(out_fused.Read().data(), ref.data(), n, 4), 0) << "fused fp32, " << n;
    GpuBuffer<uint16_t> out_bf16(n);
    LORAD_ASSERT_LAUNCH(nf4_dequantize_double_cuda(packed_d.get(), fused, n, out_bf16.get(),
                                                   FloatKind::kBF16, nullptr));
    std::vector<uint16_t> want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = float_to_bf16(ref[i]);
    EXPECT_EQ(Mismatches(out_bf16.Read().data(), want.data(), n, 2), 0) << "fused bf16, " << n;
  }
}

}  // namespace
}  // namespace lorad::kernels
