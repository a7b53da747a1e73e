// CUDA implementation of kernels/cross_entropy.h. Raw pointers only: no torch headers here.
//
// One block per row. The first pass keeps a running (max, sum of exp(x - max)) per thread (an
// online softmax) and merges them across the block; the second writes the gradient. Rows of a
// 128256-entry vocabulary are 250 KB in bf16, so the second read mostly hits L2.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/cross_entropy.h"
#include "kernels/device_float.cuh"

namespace lorad::kernels {
namespace {

constexpr int kThreads = 512;
constexpr int kVec = 8;  // elements per 16-byte load (bf16; fp32 takes two loads)

struct MaxSum {
  float max = -INFINITY;
  float sum = 0.0f;  // of exp(x - max)

  __device__ __forceinline__ void Add(float x) {
    if (x > max) {
      sum = sum * expf(max - x) + 1.0f;  // exp(-inf) = 0 for the first value
      max = x;
    } else {
      sum += expf(x - max);
    }
  }
  __device__ __forceinline__ void Merge(MaxSum o) {
    const float m = fmaxf(max, o.max);
    if (m == -INFINITY) return;
    sum = sum * expf(max - m) + o.sum * expf(o.max - m);
    max = m;
  }
};

__device__ __forceinline__ MaxSum WarpMerge(MaxSum v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum o;
    o.max = __shfl_xor_sync(0xffffffffu, v.max, offset);
    o.sum = __shfl_xor_sync(0xffffffffu, v.sum, offset);
    v.Merge(o);
  }
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    CrossEntropyRowsKernel(const T* __restrict__ logits, const int64_t* __restrict__ targets,
                           int64_t vocab, bool vectors, float* __restrict__ loss,
                           T* __restrict__ grad) {
  __shared__ MaxSum warp_parts[kThreads / 32];
  __shared__ float shared_lse;
  const T* row = logits + blockIdx.x * vocab;
  T* grad_row = grad == nullptr ? nullptr : grad + blockIdx.x * vocab;
  const int64_t t = targets[blockIdx.x];
  const bool valid = t >= 0 && t < vocab;
  const int64_t groups = vectors ? vocab / kVec : 0;
  if (!valid) {
    if (threadIdx.x == 0) loss[blockIdx.x] = 0.0f;
    if (grad_row == nullptr) return;
    const float zeros[kVec] = {};
    for (int64_t g = threadIdx.x; g < groups; g += kThreads)
      StoreFloats<kVec>(grad_row + g * kVec, zeros);
    for (int64_t j = groups * kVec + threadIdx.x; j < vocab; j += kThreads)
      StoreAs(grad_row + j, 0.0f);
    return;
  }

  MaxSum part;
  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    float v[kVec];
    LoadFloats<kVec>(row + g * kVec, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) part.Add(v[k]);
  }
  for (int64_t j = groups * kVec + threadIdx.x; j < vocab; j += kThreads) part.Add(ToFloat(row[j]));
  part = WarpMerge(part);
  if ((threadIdx.x & 31) == 0) warp_parts[threadIdx.x >> 5] = part;
  __syncthreads();
  if (threadIdx.x < 32) {
    MaxSum all = threadIdx.x < kThreads / 32 ? warp_parts[threadIdx.x] : MaxSum();
    all = WarpMerge(all);
    if (threadIdx.x == 0) {
      shared_lse = all.max + logf(all.sum);
      loss[blockIdx.x] = shared_lse - ToFloat(row[t]);
    }
  }
  __syncthreads();
  if (grad_row == nullptr) return;
  const float lse = shared_lse;
  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    float v[kVec];
    LoadFloats<kVec>(row + g * kVec, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float p = expf(v[k] - lse);
      v[k] = g * kVec + k == t ? p - 1.0f : p;
    }
    StoreFloats<kVec>(grad_row + g * kVec, v);
  }
  for (int64_t j = groups * kVec + threadIdx.x; j < vocab; j += kThreads) {
    const float p = expf(ToFloat(row[j]) - lse);
    StoreAs(grad_row + j, j == t ? p - 1.0f : p);
  }
}

}  // namespace

const char* cross_entropy_rows_cuda(const void* logits, FloatKind kind, const int64_t* targets,
                                    int64_t rows, int64_t vocab, float* loss, void* grad,
                                    void* stream) {
  if (rows <= 0 || vocab <= 0) return nullptr;
  if (rows > 0x7fffffff) return "cross_entropy_rows: too many rows";
  const auto s = static_cast<cudaStream_t>(stream);
  // 16-byte vectors when every row starts 16-byte aligned.
  const auto aligned = [&](const void* p, size_t element) {
    return p == nullptr ||
           (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (vocab * element) % 16 == 0);
  };
  const unsigned grid = static_cast<unsigned>(rows);
  if (kind == FloatKind::kF32) {
    const bool vectors = aligned(logits, 4) && aligned(grad, 4);
    CrossEntropyRowsKernel<float><<<grid, kThreads, 0, s>>>(static_cast<const float*>(logits),
                                                            targets, vocab, vectors, loss,
                                                            static_cast<float*>(grad));
  } else if (kind == FloatKind::kBF16) {
    const bool vectors = aligned(logits, 2) && aligned(grad, 2);
    CrossEntropyRowsKernel<__nv_bfloat16>
        <<<grid, kThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(logits), targets, vocab,
                                   vectors, loss, static_cast<__nv_bfloat16*>(grad));
  } else {
    return "cross_entropy_rows: fp32 or bf16 only";
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace lorad::kernels
