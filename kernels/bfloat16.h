// Host-side bfloat16 <-> fp32 conversions for the CPU references (kernels/*.cpp build without the
// CUDA headers). Same results as cuda_bf16.h's __bfloat162float and __float2bfloat16_rn.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/float_kind.h"

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

// Element i of a raw fp32 or bf16 buffer, as fp32 (the CPU references' loads).
inline float LoadFloat(const void* base, FloatKind kind, int64_t i) {
  if (kind == FloatKind::kF32) return static_cast<const float*>(base)[i];
  return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
}

// Stores v as element i of a raw fp32 or bf16 buffer (rounded to nearest even for bf16).
inline void StoreFloat(void* base, FloatKind kind, int64_t i, float v) {
  if (kind == FloatKind::kF32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
  }
}

}  // namespace lorad::kernels
