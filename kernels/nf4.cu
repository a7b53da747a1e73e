// CUDA implementation of kernels/nf4.h. Raw pointers only: no torch headers here.
//
// Bit-exactness with the CPU reference: every rounding step is spelled out with __fmul_rn /
// __fdiv_rn so nvcc cannot contract or approximate it, and no fast-math flags are used.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/device_float.cuh"
#include "kernels/dynamic_quant8.h"
#include "kernels/nf4.h"
#include "kernels/programmatic_launch.cuh"
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

// Where a dequantizing kernel finds block b's absmax: an fp32 array, or rebuilt from the
// double-quantized codes as Nf4Absmax specifies (multiply, then add: two roundings).
struct FloatAbsmax {
  const float* values;
  __device__ __forceinline__ float operator()(int64_t b) const { return values[b]; }
};
struct DoubleQuantAbsmax {
  Nf4Absmax a;
  __device__ __forceinline__ float operator()(int64_t b) const {
    return __fadd_rn(__fmul_rn(a.code2[a.qabsmax[b]], a.absmax2[b / kDynamicQuant8BlockSize]),
                     a.offset);
  }
};

constexpr int kDequantThreads = 256;
constexpr int kDequantGroup = 16;  // values per thread and step: 8 packed bytes

// Training dequantizes every projection three times a step, so this runs at memory speed: each
// thread loads 8 packed bytes at once and writes their 16 values in 16-byte stores, with one
// absmax (an NF4 block is 4 groups). packed 8-byte and out 16-byte aligned; the last n % 16
// values go through the first block one by one.
template <typename T, typename AbsmaxAt>
__global__ void __launch_bounds__(kDequantThreads)
    nf4_dequantize_groups_kernel(const uint8_t* __restrict__ packed, AbsmaxAt absmax_at, int64_t n,
                                 T* __restrict__ out, Nf4Tables tables) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = tables.code[threadIdx.x];
  __syncthreads();
  const int64_t groups = n / kDequantGroup;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(kDequantThreads) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * kDequantThreads) {
    const uint2 bytes = __ldg(reinterpret_cast<const uint2*>(packed) + g);
    const float scale = absmax_at(g / (kNf4BlockSize / kDequantGroup));
    float v[16];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t byte = ((k < 4 ? bytes.x : bytes.y) >> (8 * (k & 3))) & 0xFF;
      v[2 * k] = __fmul_rn(code[byte >> 4], scale);
      v[2 * k + 1] = __fmul_rn(code[byte & 0x0F], scale);
    }
    StoreFloats<kDequantGroup>(out + g * kDequantGroup, v);
  }
  if (blockIdx.x != 0) return;
  for (int64_t i = groups * kDequantGroup + threadIdx.x; i < n; i += kDequantThreads) {
    const uint8_t byte = packed[i / 2];
    const uint8_t index = i % 2 == 0 ? byte >> 4 : byte & 0x0F;
    out[i] = FromFloat<T>(__fmul_rn(code[index], absmax_at(i / kNf4BlockSize)));
  }
}

template <typename AbsmaxAt>
const char* DequantizeGroups(const uint8_t* packed, AbsmaxAt absmax_at, int64_t n, void* out,
                             FloatKind out_kind, cudaStream_t stream) {
  const int64_t groups = n / kDequantGroup;
  const int64_t grid = std::max<int64_t>(
      1,
      std::min<int64_t>((groups + kDequantThreads - 1) / kDequantThreads, int64_t{SmCount()} * 16));
  const Nf4Tables tables = MakeTables();
  switch (out_kind) {
    case FloatKind::kF32:
      nf4_dequantize_groups_kernel<<<grid, kDequantThreads, 0, stream>>>(
          packed, absmax_at, n, static_cast<float*>(out), tables);
      break;
    case FloatKind::kBF16:
      nf4_dequantize_groups_kernel<<<grid, kDequantThreads, 0, stream>>>(
          packed, absmax_at, n, static_cast<__nv_bfloat16*>(out), tables);
      break;
    case FloatKind::kF16:
      nf4_dequantize_groups_kernel<<<grid, kDequantThreads, 0, stream>>>(
          packed, absmax_at, n, static_cast<__half*>(out), tables);
      break;
  }
  return LastError();
}

bool GroupsAligned(const uint8_t* packed, const void* out) {
  return reinterpret_cast<uintptr_t>(packed) % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
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
  if (GroupsAligned(packed, out)) {
    return DequantizeGroups(packed, FloatAbsmax{absmax}, n, out, out_kind,
                            static_cast<cudaStream_t>(stream));
  }
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

const char* nf4_dequantize_double_cuda(const uint8_t* packed, const Nf4Absmax& absmax, int64_t n,
                                       void* out, FloatKind out_kind, void* stream) {
  if (n <= 0) return nullptr;
  if (!GroupsAligned(packed, out)) return "nf4_dequantize_double: packed or out misaligned";
  return DequantizeGroups(packed, DoubleQuantAbsmax{absmax}, n, out, out_kind,
                          static_cast<cudaStream_t>(stream));
}

}  // namespace lorad::kernels
