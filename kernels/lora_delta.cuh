// The second half of a LoRA delta, y += scale_s * B_s t with t summed from the shrink's partials,
// as device functions: the expand kernel (lora_bgmv.cu) and the 4-bit product's LoRA epilogue
// (nf4_mma.cu) share them, so both add bit-identical deltas.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/device_float.cuh"

namespace lorad::kernels {

// A slot index as the kernels accept it: -1 (no adapter) for a row past the end or a slot out of
// range.
__device__ __forceinline__ int32_t ValidSlot(int32_t s, int32_t num_slots) {
  return s >= 0 && s < num_slots ? s : -1;
}

// t[r] of one row: its partials summed in chunk order, 0..chunks-1. partial points at
// [chunk 0][row][r]; consecutive chunks are chunk_stride floats apart.
__device__ __forceinline__ float SumPartials(const float* partial, int64_t chunks,
                                             int64_t chunk_stride) {
  float v = 0.f;
#pragma unroll 4
  for (int64_t c = 0; c < chunks; ++c) v += partial[c * chunk_stride];
  return v;
}

// B_s[o, :] . t in r order; R consecutive elements in the widest loads (b 16-byte aligned, as the
// row of a 16-byte aligned B is when R * sizeof(T) is a multiple of 16).
template <int R, typename T>
__device__ __forceinline__ float DotRow(const T* b, const float* t) {
  float bv[R];
  LoadFloats<R>(b, bv);
  float acc = 0.f;
#pragma unroll
  for (int r = 0; r < R; ++r) acc = fmaf(bv[r], t[r], acc);
  return acc;
}

template <typename T>
__device__ __forceinline__ float DotRow(const T* b, int32_t rank, bool aligned, const float* t) {
  if (aligned) {
    switch (rank) {
      case 8:
        return DotRow<8>(b, t);
      case 16:
        return DotRow<16>(b, t);
      case 32:
        return DotRow<32>(b, t);
      case 64:
        return DotRow<64>(b, t);
    }
  }
  float acc = 0.f;
  for (int r = 0; r < rank; ++r) acc = fmaf(ToFloat(b[r]), t[r], acc);
  return acc;
}

// y_old + scale * (B_s[o, :] . t): two roundings, as the CPU reference writes it.
__device__ __forceinline__ float WithDelta(float y_old, float scale, float dot) {
  return __fadd_rn(y_old, __fmul_rn(scale, dot));
}

}  // namespace lorad::kernels
