// CUDA implementation of kernels/nf4.h. Raw pointers only: no torch headers here.
//
// Bit-exactness with the CPU reference: every rounding step is spelled out with __fmul_rn /
// __fdiv_rn so nvcc cannot contract or approximate it, and no fast-math flags are used.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/device_float.cuh"
#include "kernels/nf4.h"
#include "kernels/warp_reduce.cuh"

namespace lorad::kernels {
namespace {

// Kernel parameters live in the constant bank; the loops over them are unrolled, so every access
// uses a compile-time index.
struct Nf4Tables {
  float code[16];
  float midpoints[15];
};

Nf4Tables MakeTables() {
  Nf4Tables t{};
  for (int i = 0; i < 16; ++i) t.code[i] = kNf4Code[i];
  for (int i = 0; i < 15; ++i) t.midpoints[i] = kNf4Midpoints.v[i];
  return t;
}

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}

__device__ __forceinline__ uint8_t NearestIndex(float s, const Nf4Tables& t) {
  uint8_t index = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) index += s > t.midpoints[i] ? 1 : 0;
  return index;
}

// One warp per NF4 block of 64: lane l quantizes elements 2l and 2l+1 and writes one byte, so
// reads and writes are coalesced; the block's absmax is a warp max (exact in any order).
template <typename T>
__global__ void nf4_quantize_kernel(const T* __restrict__ w, int64_t n,
                                    uint8_t* __restrict__ packed, float* __restrict__ absmax,
                                    Nf4Tables tables) {
  const int lane = threadIdx.x & 31;
  const int64_t block = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t begin = block * kNf4BlockSize;
  if (begin >= n) return;  // whole warp leaves together
  const int64_t i0 = begin + 2 * lane;
  const float v0 = i0 < n ? ToFloat(w[i0]) : 0.f;
  const float v1 = i0 + 1 < n ? ToFloat(w[i0 + 1]) : 0.f;
  float amax = fmaxf(fabsf(v0), fabsf(v1));
  amax = WarpMax(amax);
  if (lane == 0) absmax[block] = amax;
  if (i0 >= n) return;
  const float a = fmaxf(amax, 1e-38f);
  const bool full = n - begin >= kNf4BlockSize;
  const float inv = __fdiv_rn(1.0f, a);
  auto scale = [&](float v) {
    const float s = full ? __fmul_rn(v, inv) : __fdiv_rn(v, a);
    return fminf(fmaxf(s, -1.0f), 1.0f);
  };
  const uint8_t hi = NearestIndex(scale(v0), tables);
  const uint8_t lo = i0 + 1 < n ? NearestIndex(scale(v1), tables) : kNf4ZeroIndex;
  packed[i0 / 2] = static_cast<uint8_t>(hi << 4 | lo);
}

// One thread per packed byte: two output values.
template <typename T>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed,
                                      const float* __restrict__ absmax, int64_t n,
                                      T* __restrict__ out, Nf4Tables tables) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = tables.code[threadIdx.x];
  __syncthreads();
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (2 * i >= n) return;
  const uint8_t byte = packed[i];
  const float scale = absmax[(2 * i) / kNf4BlockSize];
  out[2 * i] = FromFloat<T>(__fmul_rn(code[byte >> 4], scale));
  if (2 * i + 1 < n) out[2 * i + 1] = FromFloat<T>(__fmul_rn(code[byte & 0x0F], scale));
}

const char* LastError() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* nf4_quantize_cuda(const void* w, FloatKind w_kind, int64_t n, uint8_t* packed,
                              float* absmax, void* stream) {
  if (n <= 0) return nullptr;
  constexpr int kThreads = 256;  // 8 NF4 blocks per CUDA block
  const int64_t grid = (Nf4Blocks(n) * 32 + kThreads - 1) / kThreads;
  const auto s = static_cast<cudaStream_t>(stream);
  const Nf4Tables tables = MakeTables();
  switch (w_kind) {
    case FloatKind::kF32:
      nf4_quantize_kernel<<<grid, kThreads, 0, s>>>(static_cast<const float*>(w), n, packed, absmax,
                                                    tables);
      break;
    case FloatKind::kBF16:
      nf4_quantize_kernel<<<grid, kThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(w), n, packed,
                                                    absmax, tables);
      break;
    case FloatKind::kF16:
      nf4_quantize_kernel<<<grid, kThreads, 0, s>>>(static_cast<const __half*>(w), n, packed,
                                                    absmax, tables);
      break;
  }
  return LastError();
}

const char* nf4_dequantize_cuda(const uint8_t* packed, const float* absmax, int64_t n, void* out,
                                FloatKind out_kind, void* stream) {
  if (n <= 0) return nullptr;
  constexpr int kThreads = 256;
  const int64_t grid = (Nf4PackedBytes(n) + kThreads - 1) / kThreads;
  const auto s = static_cast<cudaStream_t>(stream);
  const Nf4Tables tables = MakeTables();
  switch (out_kind) {
    case FloatKind::kF32:
      nf4_dequantize_kernel<<<grid, kThreads, 0, s>>>(packed, absmax, n, static_cast<float*>(out),
                                                      tables);
      break;
    case FloatKind::kBF16:
      nf4_dequantize_kernel<<<grid, kThreads, 0, s>>>(packed, absmax, n,
                                                      static_cast<__nv_bfloat16*>(out), tables);
      break;
    case FloatKind::kF16:
      nf4_dequantize_kernel<<<grid, kThreads, 0, s>>>(packed, absmax, n, static_cast<__half*>(out),
                                                      tables);
      break;
  }
  return LastError();
}

}  // namespace lorad::kernels
