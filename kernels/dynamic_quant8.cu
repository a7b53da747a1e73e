// CUDA implementation of kernels/dynamic_quant8.h. Raw pointers only: no torch headers here.
//
// Every rounding step is explicit (__fadd_rn, __fmul_rn, __fdiv_rn) so the results equal the CPU
// reference bit for bit: nvcc would otherwise contract a * b + c into one fused multiply-add.
#include <cuda_runtime.h>

#include "kernels/dynamic_quant8.h"
#include "kernels/warp_reduce.cuh"

namespace lorad::kernels {
namespace {

constexpr int kQuantThreads = kDynamicQuant8BlockSize;  // one thread per element of a block

// Bin j of the code book (dynamic_quant8_build_lut): the number of midpoints below the bin centre,
// found by binary search over the sorted midpoints instead of a 64 KiB table.
__device__ __forceinline__ uint8_t BinToCode(int j, const float* midpoints) {
  const float centre = __fadd_rn(-1.0f, __fdiv_rn(2.0f * static_cast<float>(j), 65535.0f));
  int lo = 0, hi = 255;  // answer in [lo, hi]
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (midpoints[mid] < centre) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return static_cast<uint8_t>(lo);
}

__global__ void dynamic_quant8_quantize_kernel(const float* __restrict__ x, int64_t n, float offset,
                                               const float* __restrict__ code,
                                               uint8_t* __restrict__ q,
                                               float* __restrict__ absmax) {
  __shared__ float midpoints[255];
  __shared__ float warp_max[kQuantThreads / 32];
  if (threadIdx.x < 255) {
    midpoints[threadIdx.x] = __fmul_rn(0.5f, __fadd_rn(code[threadIdx.x], code[threadIdx.x + 1]));
  }
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kQuantThreads + threadIdx.x;
  const float v = i < n ? __fadd_rn(x[i], -offset) : 0.f;
  // fmaxf ignores NaN, as the CPU reference's `v > amax` does.
  float amax = fabsf(v);
  amax = WarpMax(amax);
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();
  amax = warp_max[0];
  for (int w = 1; w < kQuantThreads / 32; ++w) amax = fmaxf(amax, warp_max[w]);
  if (threadIdx.x == 0) absmax[blockIdx.x] = amax;
  if (i >= n) return;
  if (amax == 0.f) {
    q[i] = 0;
    return;
  }
  const float inv = __fdiv_rn(1.0f, amax);
  float s = __fmul_rn(v, inv);
  s = s >= -1.0f ? fminf(s, 1.0f) : -1.0f;  // clamp, NaN -> -1
  float t = __fadd_rn(s, 1.0f);
  t = __fmul_rn(t, 0.5f);
  t = __fmul_rn(t, 65535.0f);
  t = __fadd_rn(t, 0.5f);
  q[i] = BinToCode(static_cast<int>(t), midpoints);
}

__global__ void dynamic_quant8_dequantize_kernel(const uint8_t* __restrict__ q,
                                                 const float* __restrict__ absmax,
                                                 const float* __restrict__ code, int64_t n,
                                                 int blocksize, float offset,
                                                 float* __restrict__ y) {
  __shared__ float code_s[256];
  code_s[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i] = __fadd_rn(__fmul_rn(code_s[q[i]], absmax[i / blocksize]), offset);
}

const char* LastError() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* dynamic_quant8_quantize_cuda(const float* x, int64_t n, float offset, int blocksize,
                                         const float* code, uint8_t* q, float* absmax,
                                         void* stream) {
  if (blocksize != kQuantThreads) return "dynamic_quant8_quantize_cuda: blocksize must be 256";
  if (n <= 0) return nullptr;
  const int64_t grid = (n + kQuantThreads - 1) / kQuantThreads;
  dynamic_quant8_quantize_kernel<<<grid, kQuantThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, n, offset, code, q, absmax);
  return LastError();
}

const char* dynamic_quant8_dequantize_cuda(const uint8_t* q, const float* absmax, const float* code,
                                           int64_t n, int blocksize, float offset, float* y,
                                           void* stream) {
  if (n <= 0) return nullptr;
  constexpr int kThreads = 256;  // also the code book size loaded into shared memory
  const int64_t grid = (n + kThreads - 1) / kThreads;
  dynamic_quant8_dequantize_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      q, absmax, code, n, blocksize, offset, y);
  return LastError();
}

}  // namespace lorad::kernels
