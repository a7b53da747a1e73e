// CUDA implementation of kernels/paged_attention.h. Raw pointers only: no torch headers here.
//
// One block per (row, query head), kThreads threads. Keys are taken in tiles of kTile: each warp
// computes the scores of some of the tile's keys (lanes split head_dim, so each key's read is
// coalesced), then every thread owns up to two output dims and adds the tile's p * v with an
// online softmax (running max and sum, rescaled when the max grows). Shared memory is fixed, so
// any context length works.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/device_float.cuh"
#include "kernels/paged_attention.h"

namespace lorad::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;
constexpr int kMaxHeadDim = 256;
constexpr int kMaxDimsPerLane = kMaxHeadDim / 32;
constexpr int kMaxDimsPerThread = kMaxHeadDim / kThreads;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    PagedAttentionKernel(const T* __restrict__ q, const T* __restrict__ k_pool,
                         const T* __restrict__ v_pool, const int32_t* __restrict__ block_tables,
                         const int32_t* __restrict__ context_lens, PagedAttentionShape shape,
                         float scale, T* __restrict__ out) {
  __shared__ float s_p[kTile];       // scores, then probabilities, of the tile's keys
  __shared__ int64_t s_base[kTile];  // element offset of each key's (slot, kv head) row
  const int64_t b = blockIdx.x;
  const int64_t h = blockIdx.y;
  const int d_size = static_cast<int>(shape.head_dim);
  const int64_t g = h / (shape.heads / shape.kv_heads);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t n = context_lens[b];
  const int32_t* table = block_tables + b * shape.max_blocks;
  const T* q_row = q + (b * shape.heads + h) * d_size;

  float q_reg[kMaxDimsPerLane];
  const int lane_dims = d_size / 32;
#pragma unroll
  for (int i = 0; i < kMaxDimsPerLane; ++i) {
    q_reg[i] = i < lane_dims ? ToFloat(q_row[lane + 32 * i]) : 0.0f;
  }
  float acc[kMaxDimsPerThread] = {};
  float running_max = -INFINITY;
  float running_sum = 0.0f;

  for (int64_t start = 0; start < n; start += kTile) {
    const int count = static_cast<int>(n - start < kTile ? n - start : kTile);
    for (int j = threadIdx.x; j < count; j += kThreads) {
      const int64_t t = start + j;
      const int64_t slot = static_cast<int64_t>(table[t / shape.block_size]) * shape.block_size +
                           t % shape.block_size;
      s_base[j] = (slot * shape.kv_heads + g) * d_size;
    }
    __syncthreads();
    for (int j = warp; j < count; j += kWarps) {
      const T* k_row = k_pool + s_base[j];
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kMaxDimsPerLane; ++i) {
        if (i < lane_dims) dot += q_reg[i] * ToFloat(k_row[lane + 32 * i]);
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      }
      if (lane == 0) s_p[j] = dot * scale;
    }
    __syncthreads();
    float tile_max = -INFINITY;
    for (int j = 0; j < count; ++j) tile_max = fmaxf(tile_max, s_p[j]);
    const float new_max = fmaxf(running_max, tile_max);
    const float rescale = expf(running_max - new_max);  // 0 on the first tile
    __syncthreads();  // every thread has read the scores before they become probabilities
    for (int j = threadIdx.x; j < count; j += kThreads) s_p[j] = expf(s_p[j] - new_max);
    __syncthreads();
    float tile_sum = 0.0f;
    for (int j = 0; j < count; ++j) tile_sum += s_p[j];
    running_sum = running_sum * rescale + tile_sum;
#pragma unroll
    for (int i = 0; i < kMaxDimsPerThread; ++i) {
      const int d = threadIdx.x + kThreads * i;
      if (d >= d_size) continue;
      float a = acc[i] * rescale;
      for (int j = 0; j < count; ++j) a += s_p[j] * ToFloat(v_pool[s_base[j] + d]);
      acc[i] = a;
    }
    running_max = new_max;
    __syncthreads();  // the next tile overwrites s_p and s_base
  }
  T* out_row = out + (b * shape.heads + h) * d_size;
#pragma unroll
  for (int i = 0; i < kMaxDimsPerThread; ++i) {
    const int d = threadIdx.x + kThreads * i;
    if (d < d_size) StoreAs(out_row + d, acc[i] / running_sum);
  }
}

template <typename T>
const char* Launch(const void* q, const void* k_pool, const void* v_pool,
                   const int32_t* block_tables, const int32_t* context_lens,
                   const PagedAttentionShape& shape, float scale, void* out, void* stream) {
  const dim3 grid(static_cast<unsigned>(shape.rows), static_cast<unsigned>(shape.heads));
  PagedAttentionKernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const T*>(q), static_cast<const T*>(k_pool), static_cast<const T*>(v_pool),
      block_tables, context_lens, shape, scale, static_cast<T*>(out));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* paged_attention_cuda(const void* q, const void* k_pool, const void* v_pool,
                                 FloatKind kind, const int32_t* block_tables,
                                 const int32_t* context_lens, const PagedAttentionShape& shape,
                                 float scale, void* out, void* stream) {
  if (const char* bad = paged_attention_check(shape); bad[0] != '\0') return bad;
  if (shape.head_dim % 32 != 0 || shape.head_dim > kMaxHeadDim) {
    return "paged attention (CUDA): head_dim must be a multiple of 32, at most 256";
  }
  if (shape.rows > 0x7fffffff || shape.heads > 65535) {
    return "paged attention (CUDA): too many rows or heads for one launch";
  }
  if (shape.rows == 0) return nullptr;
  switch (kind) {
    case FloatKind::kF32:
      return Launch<float>(q, k_pool, v_pool, block_tables, context_lens, shape, scale, out,
                           stream);
    case FloatKind::kBF16:
      return Launch<__nv_bfloat16>(q, k_pool, v_pool, block_tables, context_lens, shape, scale, out,
                                   stream);
    case FloatKind::kF16:
      break;
  }
  return "paged attention (CUDA): q, k and v must be fp32 or bf16";
}

}  // namespace lorad::kernels
