// NF4 4-bit quantization in bitsandbytes' layout, so checkpoints interoperate.
//
// Format (bitsandbytes quantize_4bit, quant_type="nf4"):
//   - the weight is flattened row-major and cut into blocks of kNf4BlockSize elements;
//   - absmax[b] = max |w| over block b (fp32);
//   - each element is w / absmax[b], rounded to the nearest of the 16 kNf4Code values, stored as
//     its 4-bit index;
//   - two indices per byte, the first element of the pair in the high nibble.
// Dequantization: w = kNf4Code[index] * absmax[b].
//
// Every function here takes raw pointers and sizes; the CPU versions are the specification, the
// CUDA versions (nf4.cu) must match them exactly.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lorad::kernels {

inline constexpr int kNf4BlockSize = 64;

// The 16 NF4 levels (normal-distribution quantiles scaled to [-1, 1]), bitsandbytes' values.
extern const float kNf4Code[16];

// Index of the NF4 level nearest to x (x already divided by its block's absmax, in [-1, 1]).
// Ties at a midpoint go to the lower level, as bitsandbytes' decision tree does.
uint8_t nf4_nearest_index(float x);

// Quantizes n floats (n a multiple of kNf4BlockSize). packed: n/2 bytes, absmax: n/64 floats.
void nf4_quantize_cpu(const float* w, int64_t n, uint8_t* packed, float* absmax);

// Dequantizes n values. packed: n/2 bytes, absmax: n/64 floats, out: n floats.
void nf4_dequantize_cpu(const uint8_t* packed, const float* absmax, int64_t n, float* out);

#if defined(LORAD_WITH_CUDA)
// Same contract as nf4_dequantize_cpu, device pointers, on the given stream (cudaStream_t).
void nf4_dequantize_cuda(const uint8_t* packed, const float* absmax, int64_t n, float* out,
                         void* stream);
#endif

}  // namespace lorad::kernels
