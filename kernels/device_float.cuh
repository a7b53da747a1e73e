// Device-side element conversions shared by the CUDA kernels: every kernel computes in fp32 and
// reads / writes its buffers as fp32, bf16 or fp16 (kernels/float_kind.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lorad::kernels {

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

// Rounds to nearest even in the pointee's type.
__device__ __forceinline__ void StoreAs(float* p, float v) { *p = v; }
__device__ __forceinline__ void StoreAs(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void StoreAs(__half* p, float v) { *p = __float2half_rn(v); }

}  // namespace lorad::kernels
