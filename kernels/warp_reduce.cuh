// Butterfly reductions across the 32 lanes of a warp: every lane gets the result. Shared by the
// CUDA kernels that reduce within a warp before a block-wide step.
#pragma once

#include <cuda_runtime.h>

namespace lorad::kernels {

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace lorad::kernels
