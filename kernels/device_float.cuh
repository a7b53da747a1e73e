// Device-side element conversions shared by the CUDA kernels: every kernel computes in fp32 and
// reads / writes its buffers as fp32, bf16 or fp16 (kernels/float_kind.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lorad::kernels {

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

// Rounds to nearest even in the pointee's type.
__device__ __forceinline__ void StoreAs(float* p, float v) { *p = v; }
__device__ __forceinline__ void StoreAs(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void StoreAs(__half* p, float v) { *p = __float2half_rn(v); }

// v rounded to nearest even in the pointee's type, as fp32 (the pointer only picks the type).
__device__ __forceinline__ float Round(float v, const float*) { return v; }
__device__ __forceinline__ float Round(float v, const __nv_bfloat16*) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
__device__ __forceinline__ float Round(float v, const __half*) {
  return __half2float(__float2half_rn(v));
}

// LlamaMLP's act_fn(gate) * up for one element of T (kernels/layer_ops.h, silu_mul): silu(g)
// rounded to T, times u, in fp32 (the caller rounds the product as it stores it). One definition
// for silu_mul and the 4-bit gate/up product that ends in it, so both give the same bits.
template <typename T>
__device__ __forceinline__ float SiluTimes(float g, float u) {
  const float silu = Round(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), static_cast<const T*>(nullptr));
  return __fmul_rn(silu, u);
}

// N consecutive elements at p into fp32, in the widest loads their alignment allows: p must be
// aligned to N * sizeof(T) rounded down to a power of two (at most 16 bytes). fp32 and bf16.
template <int N>
__device__ __forceinline__ void LoadFloats(const float* p, float* out) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + i);
      out[i] = v.x, out[i + 1] = v.y, out[i + 2] = v.z, out[i + 3] = v.w;
    }
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      const float2 v = *reinterpret_cast<const float2*>(p + i);
      out[i] = v.x, out[i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

// A 32-bit word of two bf16 values (the lower address in the low half) into two floats: a bf16 is
// the high half of its fp32.
__device__ __forceinline__ void Bf16PairToFloats(uint32_t w, float* out) {
  out[0] = __uint_as_float(w << 16);
  out[1] = __uint_as_float(w & 0xffff0000u);
}

template <int N>
__device__ __forceinline__ void LoadFloats(const __nv_bfloat16* p, float* out) {
  if constexpr (N % 8 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 8) {
      const uint4 v = *reinterpret_cast<const uint4*>(p + i);
      Bf16PairToFloats(v.x, out + i), Bf16PairToFloats(v.y, out + i + 2);
      Bf16PairToFloats(v.z, out + i + 4), Bf16PairToFloats(v.w, out + i + 6);
    }
  } else if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const uint2 v = *reinterpret_cast<const uint2*>(p + i);
      Bf16PairToFloats(v.x, out + i), Bf16PairToFloats(v.y, out + i + 2);
    }
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      Bf16PairToFloats(*reinterpret_cast<const uint32_t*>(p + i), out + i);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = ToFloat(p[i]);
  }
}

// N values into consecutive elements at p, each rounded to nearest even: one plain store for
// N == 1, else 16-byte stores (p 16-byte aligned, N a multiple of 4 for fp32, of 8 for bf16 and
// fp16).
template <int N>
__device__ __forceinline__ void StoreFloats(float* p, const float* v) {
  static_assert(N == 1 || N % 4 == 0, "StoreFloats<N>(float*): N must be 1 or a multiple of 4");
  if constexpr (N == 1) {
    *p = v[0];
  } else {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      *reinterpret_cast<float4*>(p + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    }
  }
}

__device__ __forceinline__ uint32_t BitsOf(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ uint32_t BitsOf(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ __nv_bfloat16 RoundTo(float v, __nv_bfloat16*) {
  return __float2bfloat16_rn(v);
}
__device__ __forceinline__ __half RoundTo(float v, __half*) { return __float2half_rn(v); }

template <int N, typename T>
__device__ __forceinline__ void StoreFloats(T* p, const float* v) {
  static_assert(N == 1 || N % 8 == 0, "StoreFloats<N>(16-bit*): N must be 1 or a multiple of 8");
  if constexpr (N == 1) {
    *p = RoundTo(v[0], p);
  } else {
#pragma unroll
    for (int i = 0; i < N; i += 8) {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        w[k] = BitsOf(RoundTo(v[i + 2 * k], p)) | BitsOf(RoundTo(v[i + 2 * k + 1], p)) << 16;
      }
      *reinterpret_cast<uint4*>(p + i) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

}  // namespace lorad::kernels
