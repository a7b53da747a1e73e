// Host-side bfloat16 <-> fp32 conversions for the CPU references (kernels/*.cpp build without the
// CUDA headers). Same results as cuda_bf16.h's __bfloat162float and __float2bfloat16_rn.
#pragma once

#include <cstdint>
#include <cstring>

namespace lorad::kernels {

// bf16 is the upper half of an fp32, so widening is exact.
inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest, ties to even; NaN stays a (quiet) NaN with its sign.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace lorad::kernels
