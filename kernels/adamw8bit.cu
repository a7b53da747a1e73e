// CUDA implementation of kernels/adamw8bit.h. Raw pointers only: no torch headers here.
//
// One thread block per 256-element quantization block, one element per thread, both code books in
// shared memory. Every rounding is explicit (__fmul_rn, __fadd_rn, __fmaf_rn, __fdiv_rn,
// __fsqrt_rn): nvcc would otherwise contract a * b + c and may approximate division, and the
// result must equal the CPU reference (adamw8bit.cpp) bit for bit.
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>

#include "kernels/adamw8bit.h"
#include "kernels/warp_reduce.cuh"

namespace lorad::kernels {
namespace {

constexpr int kThreads = kAdamW8bitBlockSize;
constexpr int kWarps = kThreads / 32;

// dynamic_code_index (adamw8bit.cpp), on a code book in shared memory.
__device__ __forceinline__ uint8_t CodeIndex(const float* code, float lower_bound, float x) {
  int pivot = 127;
  int upper_pivot = 255;
  int lower_pivot = 0;
  float lower = lower_bound;
  float upper = 1.0f;
  float val = code[pivot];
#pragma unroll
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (x > val) {
    const float midpoint = __fmul_rn(__fadd_rn(upper, val), 0.5f);
    return static_cast<uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = __fmul_rn(__fadd_rn(lower, val), 0.5f);
  return static_cast<uint8_t>(x < midpoint ? lower_pivot : pivot);
}

// Maximum over the thread block. fmaxf ignores NaN, as std::fmax does in the CPU reference; the
// order of a max reduction does not change its result. scratch: [kWarps] in shared memory.
__device__ __forceinline__ float BlockMax(float x, float* scratch) {
  x = WarpMax(x);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < kWarps; ++w) r = fmaxf(r, scratch[w]);
  return r;
}

__global__ void __launch_bounds__(kThreads)
    adamw8bit_step_kernel(float* __restrict__ param, const float* __restrict__ grad,
                          uint8_t* __restrict__ q1, uint8_t* __restrict__ q2,
                          float* __restrict__ absmax1, float* __restrict__ absmax2,
                          const float* __restrict__ code1, const float* __restrict__ code2,
                          int64_t n, AdamW8bitScalars s) {
  __shared__ float code1_s[256];
  __shared__ float code2_s[256];
  __shared__ float max1_s[kWarps];
  __shared__ float max2_s[kWarps];
  code1_s[threadIdx.x] = code1[threadIdx.x];
  code2_s[threadIdx.x] = code2[threadIdx.x];
  __syncthreads();

  const int64_t b = blockIdx.x;
  const int64_t i = b * kThreads + threadIdx.x;
  const bool valid = i < n;
  const float g = valid ? grad[i] : 0.f;
  const bool finite = valid && isfinite(g);
  float m = 0.f;
  float v = 0.f;
  if (finite) {
    const float m_old = __fmul_rn(code1_s[q1[i]], absmax1[b]);
    const float v_old = __fmul_rn(code2_s[q2[i]], absmax2[b]);
    m = __fmaf_rn(g, s.one_minus_beta1, __fmul_rn(m_old, s.beta1));
    v = __fmaf_rn(__fmul_rn(s.one_minus_beta2, g), g, __fmul_rn(v_old, s.beta2));
  }
  // Elements past n do not count toward the scales (the CPU reference's short last block). Every
  // thread has read the old scales before BlockMax's barrier, so thread 0 may overwrite them.
  const float amax1 = BlockMax(valid ? fabsf(m) : -FLT_MAX, max1_s);
  const float amax2 = BlockMax(valid ? fabsf(v) : -FLT_MAX, max2_s);
  if (threadIdx.x == 0) {
    absmax1[b] = amax1;
    absmax2[b] = amax2;
  }
  if (!valid) return;

  if (finite) {
    float p = param[i];
    if (s.apply_decay) p = __fmul_rn(p, s.decay);
    const float denom = __fadd_rn(__fsqrt_rn(v), s.eps_scaled);
    param[i] = __fmaf_rn(__fdiv_rn(m, denom), s.step_size, p);
  }
  uint8_t c1 = CodeIndex(code1_s, -1.0f, __fdiv_rn(m, amax1));
  if (signbit(code1_s[c1]) != signbit(m)) {
    c1 = static_cast<uint8_t>(m > 0.f ? c1 + 1 : c1 - 1);
  }
  q1[i] = c1;
  q2[i] = CodeIndex(code2_s, 0.0f, __fdiv_rn(v, amax2));
}

}  // namespace

const char* adamw8bit_step_cuda(float* param, const float* grad, uint8_t* q1, uint8_t* q2,
                                float* absmax1, float* absmax2, const float* code1,
                                const float* code2, int64_t n, const AdamW8bitScalars& s,
                                void* stream) {
  if (n <= 0) return nullptr;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > INT_MAX) return "adamw8bit_step_cuda: more than 2^31-1 blocks of 256 elements";
  adamw8bit_step_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                          static_cast<cudaStream_t>(stream)>>>(param, grad, q1, q2, absmax1,
                                                               absmax2, code1, code2, n, s);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace lorad::kernels
