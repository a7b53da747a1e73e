// One element of a rotary embedding (transformers' apply_rotary_pos_emb), as layer_ops.h's rotary
// and rotary_store define it: shared by layer_ops.cu and paged_attention.cu (which rotates q and
// the new key itself when it also does the step's cache write), so both give the same bits.
// Included by .cu files only.
#pragma once

#include <cstdint>

#include "kernels/device_float.cuh"

namespace lorad::kernels {

// Element d of the rotated head vector at x (head_dim elements; angle: the row's cos, sin), before
// its final rounding to T (StoreAs or Round do that).
template <typename T>
__device__ __forceinline__ float RotatedAt(const T* __restrict__ x, const T* __restrict__ cos,
                                           const T* __restrict__ sin, int64_t d, int64_t head_dim,
                                           const T* round_as) {
  const int64_t half = head_dim / 2;
  const float rot = d < half ? -ToFloat(x[d + half]) : ToFloat(x[d - half]);
  const float a = Round(__fmul_rn(ToFloat(x[d]), ToFloat(cos[d])), round_as);
  const float b = Round(__fmul_rn(rot, ToFloat(sin[d])), round_as);
  return __fadd_rn(a, b);
}

}  // namespace lorad::kernels
