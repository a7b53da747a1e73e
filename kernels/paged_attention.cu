// CUDA implementation of kernels/paged_attention.h. Raw pointers only: no torch headers here.
//
// One block per (row, query head), kThreads threads; keys in tiles of kTile = kThreads, one key
// per thread. A thread reads its key's whole row (head_dim values in 16-byte loads, all in flight
// at once) and takes the dot product with q from shared memory; the block reduces the tile's max
// and sum, and an online softmax (running max and sum, rescaled when the max grows) carries them
// across tiles. For p * v, warp w takes the tile's keys w, w + 8, ... and lane l the head dims
// [l * D / 32, (l + 1) * D / 32), so each key's value row is one coalesced warp load; the warps'
// partial sums meet in shared memory at the end, in warp order.
//
// Decode attention is latency-bound: a step reads little (128 keys x 8 KV heads x 256 B for the
// 8B shape), so what counts is how many dependent memory round trips a block makes. The first
// version (a warp per key, one key at a time, 64-key tiles) took 36 us per layer at batch 1 with
// 160 keys, as long as the layer's q and o products together; this one makes about three per
// tile. Launched with programmatic dependent launch: it starts while the kernel before drains.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/device_float.cuh"
#include "kernels/paged_attention.h"
#include "kernels/programmatic_launch.cuh"
#include "kernels/warp_reduce.cuh"

namespace lorad::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = kThreads;
constexpr int kMaxHeadDim = 256;

// kDimsPerLane = head_dim / 32.
template <typename T, int kDimsPerLane>
__global__ void __launch_bounds__(kThreads)
    PagedAttentionKernel(const T* __restrict__ q, const T* __restrict__ k_pool,
                         const T* __restrict__ v_pool, const int32_t* __restrict__ block_tables,
                         const int32_t* __restrict__ context_lens, PagedAttentionShape shape,
                         float scale, T* __restrict__ out) {
  AllowDependents();
  WaitForPredecessor();  // q and the cache are earlier kernels' outputs
  constexpr int kHeadDim = 32 * kDimsPerLane;
  // A key row in chunks of up to 32 elements (64 bytes of bf16), loaded together.
  constexpr int kChunk = kHeadDim < 32 ? kHeadDim : 32;
  __shared__ float s_q[kHeadDim];
  __shared__ float s_p[kTile];       // the tile's probabilities
  __shared__ int64_t s_base[kTile];  // element offset of each key's (slot, kv head) row
  __shared__ float s_max[kWarps], s_sum[kWarps];
  __shared__ float s_acc[kWarps][kHeadDim];
  const int64_t b = blockIdx.x;
  const int64_t h = blockIdx.y;
  const int64_t g = h / (shape.heads / shape.kv_heads);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t n = context_lens[b];
  const int32_t* table = block_tables + b * shape.max_blocks;
  const T* q_row = q + (b * shape.heads + h) * kHeadDim;
  for (int d = threadIdx.x; d < kHeadDim; d += kThreads) s_q[d] = ToFloat(q_row[d]);
  __syncthreads();

  float acc[kDimsPerLane] = {};  // this warp's keys, dims lane * kDimsPerLane + i
  float running_max = -INFINITY;
  float running_sum = 0.0f;
  for (int64_t start = 0; start < n; start += kTile) {
    const int count = static_cast<int>(n - start < kTile ? n - start : kTile);
    const int j = threadIdx.x;
    float score = -INFINITY;
    if (j < count) {
      const int64_t t = start + j;
      const int64_t slot = static_cast<int64_t>(table[t / shape.block_size]) * shape.block_size +
                           t % shape.block_size;
      const int64_t base = (slot * shape.kv_heads + g) * kHeadDim;
      s_base[j] = base;
      float dot = 0.0f;
#pragma unroll
      for (int c = 0; c < kHeadDim; c += kChunk) {
        float k[kChunk];
        LoadFloats<kChunk>(k_pool + base + c, k);
#pragma unroll
        for (int e = 0; e < kChunk; ++e) dot = fmaf(s_q[c + e], k[e], dot);
      }
      score = dot * scale;
    }
    const float warp_max = WarpMax(score);
    if (lane == 0) s_max[warp] = warp_max;
    __syncthreads();
    float tile_max = s_max[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) tile_max = fmaxf(tile_max, s_max[w]);
    const float new_max = fmaxf(running_max, tile_max);
    const float rescale = expf(running_max - new_max);  // 0 on the first tile
    const float p = j < count ? expf(score - new_max) : 0.0f;
    s_p[j] = p;
    const float warp_sum = WarpSum(p);
    if (lane == 0) s_sum[warp] = warp_sum;
    __syncthreads();
    float tile_sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) tile_sum += s_sum[w];
    running_sum = running_sum * rescale + tile_sum;
    running_max = new_max;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[i] *= rescale;
#pragma unroll 4
    for (int key = warp; key < count; key += kWarps) {
      float v[kDimsPerLane];
      LoadFloats<kDimsPerLane>(v_pool + s_base[key] + lane * kDimsPerLane, v);
      const float pk = s_p[key];
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) acc[i] = fmaf(pk, v[i], acc[i]);
    }
    __syncthreads();  // the next tile overwrites s_p, s_base, s_max and s_sum
  }
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) s_acc[warp][lane * kDimsPerLane + i] = acc[i];
  __syncthreads();
  T* out_row = out + (b * shape.heads + h) * kHeadDim;
  for (int d = threadIdx.x; d < kHeadDim; d += kThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += s_acc[w][d];
    StoreAs(out_row + d, sum / running_sum);
  }
}

template <typename T, int kDimsPerLane>
const char* LaunchDims(const void* q, const void* k_pool, const void* v_pool,
                       const int32_t* block_tables, const int32_t* context_lens,
                       const PagedAttentionShape& shape, float scale, void* out, void* stream) {
  const dim3 grid(static_cast<unsigned>(shape.rows), static_cast<unsigned>(shape.heads));
  const cudaError_t err = LaunchMaybeOverlapped(
      PagedAttentionKernel<T, kDimsPerLane>, grid, dim3(kThreads), 0,
      static_cast<cudaStream_t>(stream), /*overlapped=*/true, static_cast<const T*>(q),
      static_cast<const T*>(k_pool), static_cast<const T*>(v_pool), block_tables, context_lens,
      shape, scale, static_cast<T*>(out));
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* Launch(const void* q, const void* k_pool, const void* v_pool,
                   const int32_t* block_tables, const int32_t* context_lens,
                   const PagedAttentionShape& shape, float scale, void* out, void* stream) {
  switch (shape.head_dim / 32) {
#define LORAD_HEAD_DIM_CASE(n)                                                                \
  case n:                                                                                     \
    return LaunchDims<T, n>(q, k_pool, v_pool, block_tables, context_lens, shape, scale, out, \
                            stream);
    LORAD_HEAD_DIM_CASE(1)
    LORAD_HEAD_DIM_CASE(2)
    LORAD_HEAD_DIM_CASE(3)
    LORAD_HEAD_DIM_CASE(4)
    LORAD_HEAD_DIM_CASE(5)
    LORAD_HEAD_DIM_CASE(6)
    LORAD_HEAD_DIM_CASE(7)
    LORAD_HEAD_DIM_CASE(8)
#undef LORAD_HEAD_DIM_CASE
  }
  return "paged attention (CUDA): head_dim must be a multiple of 32, at most 256";
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
