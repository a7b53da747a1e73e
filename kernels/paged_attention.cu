// CUDA implementation of kernels/paged_attention.h. Raw pointers only: no torch headers here.
//
// One block per (row, group of kHeads query heads sharing a KV head), kThreads threads; keys in
// tiles of up to 128. A tile's key and value rows come into shared memory together by
// asynchronous copies, in one memory round trip; two threads per key then take the dot products
// with the block's queries, the block reduces the tile's max and sum per head, and an online
// softmax (running max and sum, rescaled when the max grows) carries them across tiles. For
// p * v, warp w takes the tile's keys w, w + 8, ... and lane l the head dims
// [l * D / 32, (l + 1) * D / 32); the warps' partial sums meet in shared memory at the end, in
// warp order.
//
// Decode attention is latency-bound: a step reads little (a few hundred keys x 8 KV heads x
// 256 B per row for the 8B shape), so what counts is how many dependent memory round trips a
// block makes. The version before this one read each key row into registers (the compiler kept
// three 16-byte loads in flight: about five round trips), then the value rows four keys at a
// time (eight more per 256 keys), and each query head's block read its KV head's rows again:
// with 4 query heads per KV head (Llama-3-8B) 4x the traffic and 1024 blocks at batch 32. Now a
// tile is one round trip, and from 2 rows per KV head on (PlanHeadsPerBlock) one block serves
// all the query heads of its KV head. Launched with programmatic dependent launch: it starts
// while the kernel before drains.
//
// At batch 1 to 4 that is too few blocks for the GPU (32 at batch 1 for Llama-3-8B's heads), so
// each block's keys are split over a cluster of 2 to 8 blocks (sm_90, flash-decoding's split):
// each takes a contiguous range of the keys, and the cluster's first block merges the others'
// maxima, sums and partial outputs through distributed shared memory: no workspace, no second
// kernel.
//
// paged_attention_rotary_cuda also does the step's rotary and cache write (rotary_store): each
// block rotates its queries as it loads them, and the blocks whose keys end with the row's new one
// rotate that key and write it and its value to the pools before their first tile reads them. One
// kernel fewer a decoder layer: a captured decode step 1.0% faster at batch 1, 0.8% at batch 32
// (bench/results/2026-12-03-h200-generation-8b-ab-rotary-in-attention.txt).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "kernels/async_copy.cuh"
#include "kernels/device_float.cuh"
#include "kernels/paged_attention.h"
#include "kernels/programmatic_launch.cuh"
#include "kernels/rotary_math.cuh"
#include "kernels/warp_reduce.cuh"

namespace lorad::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeadDim = 256;
constexpr int kMaxTileKeys = kThreads / 2;  // two threads per key for the scores
constexpr int kRowsBytes = 32 * 1024;       // the staged key (or value) rows of a tile

// Keys per tile: two threads per key, fewer where their rows would pass kRowsBytes.
template <typename T, int kDimsPerLane>
__host__ __device__ constexpr int TileKeys() {
  constexpr int row_bytes = 32 * kDimsPerLane * static_cast<int>(sizeof(T));
  return kRowsBytes / row_bytes < kMaxTileKeys ? kRowsBytes / row_bytes : kMaxTileKeys;
}

// Dynamic shared memory: the tile's key rows, then its value rows; at the end the warps' partial
// sums in their place.
template <typename T, int kDimsPerLane, int kHeads>
constexpr size_t DynamicBytes() {
  const size_t rows = 2 * size_t{32} * kDimsPerLane * sizeof(T) * TileKeys<T, kDimsPerLane>();
  const size_t partials = sizeof(float) * kWarps * kHeads * 32 * kDimsPerLane;
  return rows > partials ? rows : partials;
}

// kDimsPerLane = head_dim / 32; kHeads query heads of one KV head per block.
template <typename T, int kDimsPerLane, int kHeads>
__global__ void __launch_bounds__(kThreads)
    PagedAttentionKernel(const T* __restrict__ q, T* __restrict__ k_pool, T* __restrict__ v_pool,
                         const int32_t* __restrict__ block_tables,
                         const int32_t* __restrict__ context_lens, PagedAttentionShape shape,
                         float scale, const PagedAttentionRotary rotary, T* __restrict__ out) {
  AllowDependents();
  constexpr int kHeadDim = 32 * kDimsPerLane;
  constexpr int kTile = TileKeys<T, kDimsPerLane>();
  constexpr int kPieces = kHeadDim * static_cast<int>(sizeof(T)) / 16;  // 16-byte pieces per row
  constexpr int kPerPiece = 16 / static_cast<int>(sizeof(T));
  constexpr int kRowBytes = kPieces * 16;
  extern __shared__ __align__(16) unsigned char dynamic[];
  unsigned char* s_k = dynamic;  // [kTile] rows, pieces rotated
  const T* s_v = reinterpret_cast<const T*>(dynamic + kTile * kRowBytes);  // [kTile][kHeadDim]
  float* s_acc = reinterpret_cast<float*>(dynamic);  // [kWarps][kHeads][kHeadDim], at the end
  __shared__ __align__(16) float s_q[kHeads][kHeadDim];
  __shared__ float s_p[kHeads][kTile];  // the tile's probabilities
  __shared__ float s_max[kWarps][kHeads], s_sum[kWarps][kHeads];
  __shared__ float s_total[kHeads];      // the softmax denominators, for the last step
  __shared__ float s_final_max[kHeads];  // and the maxima they are relative to (for a split)
  const int64_t b = blockIdx.x;
  const int64_t group_blocks = shape.heads / shape.kv_heads / kHeads;
  const int64_t g = blockIdx.y / group_blocks;
  const int64_t h0 = g * (shape.heads / shape.kv_heads) + blockIdx.y % group_blocks * kHeads;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  // Scores: thread 2 * key + half takes the odd (half 1) or even pieces of the key's row.
  const int key = threadIdx.x / 2, half = threadIdx.x % 2;
  const int64_t n = context_lens[b];
  // This block's keys: the blockIdx.z-th of gridDim.z contiguous ranges (the cluster's split).
  const int64_t per_split = (n + gridDim.z - 1) / gridDim.z;
  const int64_t begin = per_split * blockIdx.z < n ? per_split * blockIdx.z : n;
  const int64_t end = begin + per_split < n ? begin + per_split : n;
  const int32_t* table = block_tables + b * shape.max_blocks;
  const uint32_t s_k_address = SharedAddress(s_k);
  const uint32_t s_v_address = SharedAddress(s_v);
  // The tile's key and value rows into shared memory in one round trip, each thread half of its
  // key's. Key piece c of row j goes to position (c + 2 j) % kPieces of the row, so the eight
  // threads of a 16-byte shared load (four keys, both halves) read distinct banks.
  const auto copy_tile = [&](int64_t start, int count) {
    if (key < count) {
      const int64_t t = start + key;
      const int64_t slot = static_cast<int64_t>(table[t / shape.block_size]) * shape.block_size +
                           t % shape.block_size;
      const int64_t base = (slot * shape.kv_heads + g) * kHeadDim;
      const auto* k_row = reinterpret_cast<const unsigned char*>(k_pool + base);
      const auto* v_row = reinterpret_cast<const unsigned char*>(v_pool + base);
#pragma unroll
      for (int c = half; c < kPieces; c += 2) {
        CopyAsync16(s_k_address + key * kRowBytes + (c + 2 * key) % kPieces * 16, k_row + c * 16);
        CopyAsync16(s_v_address + key * kRowBytes + c * 16, v_row + c * 16);
      }
    }
    CommitCopies();
  };
  // A block whose keys end before the row's newest holds only keys of earlier steps: their rows,
  // the block table and the lengths were written before this step's kernels began (the kernel
  // before this one, on the SM it leaves, has itself waited for all before it), so its first tile
  // is asked for before the wait for the q/k/v product, which the wait then hides.
  const bool prefetched = end < n && begin < end;
  if (prefetched) copy_tile(begin, static_cast<int>(end - begin < kTile ? end - begin : kTile));
  WaitForPredecessor();  // q (and the newest key and value) are the kernel before's outputs
  if (rotary.k == nullptr) {
    for (int e = threadIdx.x; e < kHeads * kHeadDim; e += kThreads) {
      s_q[e / kHeadDim][e % kHeadDim] = ToFloat(q[(b * shape.heads + h0) * kHeadDim + e]);
    }
  } else {
    // The step's rotary (paged_attention_rotary_cuda): the queries rotated and rounded as
    // rotary_store would store them, and, by the blocks whose keys end with the row's new one,
    // that key rotated and its value written to the pools before the first tile reads them
    // (blocks of one KV head write the same bits).
    const T* cos = static_cast<const T*>(rotary.cos) + b * kHeadDim;
    const T* sin = static_cast<const T*>(rotary.sin) + b * kHeadDim;
    for (int e = threadIdx.x; e < kHeads * kHeadDim; e += kThreads) {
      const int d = e % kHeadDim;
      s_q[e / kHeadDim][d] = Round(
          RotatedAt(q + (b * shape.heads + h0) * kHeadDim + (e - d), cos, sin, d, kHeadDim, q), q);
    }
    if (begin < end && end == n) {
      const int64_t from = (b * shape.kv_heads + g) * kHeadDim;
      const int64_t to = (rotary.slots[b] * shape.kv_heads + g) * kHeadDim;
      const T* k_new = static_cast<const T*>(rotary.k) + from;
      for (int d = threadIdx.x; d < kHeadDim; d += kThreads) {
        StoreAs(k_pool + to + d, RotatedAt(k_new, cos, sin, d, kHeadDim, k_pool));
        v_pool[to + d] = static_cast<const T*>(rotary.v)[from + d];
      }
      __syncthreads();  // written before any thread's copies of the tile read them
    }
  }

  float acc[kHeads][kDimsPerLane] = {};  // this warp's keys, dims lane * kDimsPerLane + i
  float running_max[kHeads], running_sum[kHeads];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) running_max[h] = -INFINITY, running_sum[h] = 0.0f;
  for (int64_t start = begin; start < end; start += kTile) {
    const int count = static_cast<int>(end - start < kTile ? end - start : kTile);
    if (!(prefetched && start == begin)) copy_tile(start, count);
    WaitCopies<0>();
    __syncthreads();  // the rows (and, on the first tile, the queries) are in
    float dot[kHeads] = {};
    if (key < count) {
#pragma unroll
      for (int c = half; c < kPieces; c += 2) {
        float k[kPerPiece];  // one 16-byte load
        LoadFloats<kPerPiece>(
            reinterpret_cast<const T*>(s_k + key * kRowBytes + (c + 2 * key) % kPieces * 16), k);
#pragma unroll
        for (int e = 0; e < kPerPiece; ++e) {
#pragma unroll
          for (int h = 0; h < kHeads; ++h) dot[h] = fmaf(s_q[h][c * kPerPiece + e], k[e], dot[h]);
        }
      }
    }
    float score[kHeads];
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], 1);  // the partner half's sum
      score[h] = key < count ? dot[h] * scale : -INFINITY;
    }
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      const float warp_max = WarpMax(score[h]);
      if (lane == 0) s_max[warp][h] = warp_max;
    }
    __syncthreads();
    float rescale[kHeads];
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      float tile_max = s_max[0][h];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) tile_max = fmaxf(tile_max, s_max[w][h]);
      const float new_max = fmaxf(running_max[h], tile_max);
      rescale[h] = expf(running_max[h] - new_max);  // 0 on the first tile
      running_max[h] = new_max;
      // Each key's probability once (half 0), in the sum and in s_p.
      const float p = key < count && half == 0 ? expf(score[h] - new_max) : 0.0f;
      if (key < kTile && half == 0) s_p[h][key] = p;
      const float warp_sum = WarpSum(p);
      if (lane == 0) s_sum[warp][h] = warp_sum;
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      float tile_sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) tile_sum += s_sum[w][h];
      running_sum[h] = running_sum[h] * rescale[h] + tile_sum;
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) acc[h][i] *= rescale[h];
    }
#pragma unroll 4
    for (int j = warp; j < count; j += kWarps) {
      float v[kDimsPerLane];
      LoadFloats<kDimsPerLane>(s_v + j * kHeadDim + lane * kDimsPerLane, v);
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        const float pj = s_p[h][j];
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) acc[h][i] = fmaf(pj, v[i], acc[h][i]);
      }
    }
    __syncthreads();  // the next tile overwrites the rows, s_p, s_max and s_sum
  }
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    if (threadIdx.x == 0) s_total[h] = running_sum[h], s_final_max[h] = running_max[h];
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      s_acc[(warp * kHeads + h) * kHeadDim + lane * kDimsPerLane + i] = acc[h][i];
    }
  }
  __syncthreads();
  T* out_rows = out + (b * shape.heads + h0) * kHeadDim;
  for (int e = threadIdx.x; e < kHeads * kHeadDim; e += kThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += s_acc[w * kHeads * kHeadDim + e];
    if (gridDim.z == 1) {
      StoreAs(out_rows + e, sum / s_total[e / kHeadDim]);
    } else {
      s_acc[e] = sum;  // in warp 0's place: only this thread reads or writes column e
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (gridDim.z > 1) {
    // The split: the cluster's first block rescales every block's partial output and sum to the
    // largest of their maxima (exp(-inf) = 0 for a block without keys) and divides.
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    cluster.sync();  // every block's s_acc, s_total and s_final_max are written
    if (blockIdx.z == 0) {
      for (int e = threadIdx.x; e < kHeads * kHeadDim; e += kThreads) {
        const int h = e / kHeadDim;
        float max = -INFINITY;
        for (unsigned r = 0; r < gridDim.z; ++r) {
          max = fmaxf(max, *cluster.map_shared_rank(&s_final_max[h], r));
        }
        float sum = 0.0f, total = 0.0f;
        for (unsigned r = 0; r < gridDim.z; ++r) {
          const float weight = expf(*cluster.map_shared_rank(&s_final_max[h], r) - max);
          sum = fmaf(weight, *cluster.map_shared_rank(&s_acc[e], r), sum);
          total = fmaf(weight, *cluster.map_shared_rank(&s_total[h], r), total);
        }
        StoreAs(out_rows + e, sum / total);
      }
    }
    cluster.sync();  // the other blocks keep their shared memory until the first has read it
  }
#endif
}

// Blocks per cluster that split a block's keys: the most of 1, 2, 4 and 8 that keeps the grid
// within two blocks an SM. Measured at batch 1 on the 8B shape (32 blocks before the split;
// bench/results/2026-12-04-h200-generation-8b-ab-attention-splits.txt), decode against 4 splits
// (one wave): no split 0.895x, 8 splits 1.023x, 16 splits (a non-portable cluster, four blocks an
// SM) 0.950x.
unsigned PlanSplits(const PagedAttentionShape& shape, int heads_per_block) {
  const int64_t blocks = shape.rows * (shape.heads / heads_per_block);
  unsigned splits = 1;
  while (splits < 8 && blocks * splits * 2 <= 2 * SmCount()) splits *= 2;
  return splits;
}

template <typename T, int kDimsPerLane, int kHeads>
const char* LaunchHeads(const void* q, const void* k_pool, const void* v_pool,
                        const int32_t* block_tables, const int32_t* context_lens,
                        const PagedAttentionShape& shape, float scale,
                        const PagedAttentionRotary& rotary, void* out, void* stream) {
  const auto kernel = PagedAttentionKernel<T, kDimsPerLane, kHeads>;
  constexpr size_t kShared = DynamicBytes<T, kDimsPerLane, kHeads>();
  static std::once_flag once;
  static cudaError_t opt_in = cudaSuccess;
  // The code that runs on this device has the cluster merge (built for sm_90 or later, which
  // also says the device has clusters).
  static bool merges_splits = false;
  std::call_once(once, [&] {
    opt_in = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(kShared));
    merges_splits = HasClusterCode(kernel);
  });
  if (opt_in != cudaSuccess) return cudaGetErrorString(opt_in);
  const auto launch = [&](unsigned splits) {
    const dim3 grid(static_cast<unsigned>(shape.rows), static_cast<unsigned>(shape.heads / kHeads),
                    splits);
    return LaunchInClusters(kernel, grid, dim3(kThreads), dim3(1, 1, splits), kShared,
                            static_cast<cudaStream_t>(stream), /*overlapped=*/true,
                            static_cast<const T*>(q),
                            // Written only by the rotary launch (paged_attention_rotary_cuda).
                            const_cast<T*>(static_cast<const T*>(k_pool)),
                            const_cast<T*>(static_cast<const T*>(v_pool)), block_tables,
                            context_lens, shape, scale, rotary, static_cast<T*>(out));
  };
  const unsigned splits = merges_splits ? PlanSplits(shape, kHeads) : 1;
  cudaError_t err = launch(splits);
  if (err != cudaSuccess && splits > 1) {  // clusters refused (resources): one block a head
    cudaGetLastError();
    err = launch(1);
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Query heads per block: all those of a KV head (up to 8) when that still gives a block per SM,
// fewer (down to one) when the batch is too small for that; head dims of 64 and 128 only (the
// common ones: the others keep one head per block and compile once).
int PlanHeadsPerBlock(const PagedAttentionShape& shape) {
  if (shape.head_dim != 64 && shape.head_dim != 128) return 1;
  const int64_t group = shape.heads / shape.kv_heads;
  for (int h = 8; h > 1; h /= 2) {
    if (group % h == 0 && shape.rows * (shape.heads / h) >= SmCount()) return h;
  }
  return 1;
}

template <typename T, int kDimsPerLane>
const char* LaunchDims(const void* q, const void* k_pool, const void* v_pool,
                       const int32_t* block_tables, const int32_t* context_lens,
                       const PagedAttentionShape& shape, float scale,
                       const PagedAttentionRotary& rotary, void* out, void* stream) {
  if constexpr (kDimsPerLane == 2 || kDimsPerLane == 4) {
    switch (PlanHeadsPerBlock(shape)) {
      case 8:
        return LaunchHeads<T, kDimsPerLane, 8>(q, k_pool, v_pool, block_tables, context_lens, shape,
                                               scale, rotary, out, stream);
      case 4:
        return LaunchHeads<T, kDimsPerLane, 4>(q, k_pool, v_pool, block_tables, context_lens, shape,
                                               scale, rotary, out, stream);
      case 2:
        return LaunchHeads<T, kDimsPerLane, 2>(q, k_pool, v_pool, block_tables, context_lens, shape,
                                               scale, rotary, out, stream);
      default:
        break;
    }
  }
  return LaunchHeads<T, kDimsPerLane, 1>(q, k_pool, v_pool, block_tables, context_lens, shape,
                                         scale, rotary, out, stream);
}

template <typename T>
const char* Launch(const void* q, const void* k_pool, const void* v_pool,
                   const int32_t* block_tables, const int32_t* context_lens,
                   const PagedAttentionShape& shape, float scale,
                   const PagedAttentionRotary& rotary, void* out, void* stream) {
  switch (shape.head_dim / 32) {
#define LORAD_HEAD_DIM_CASE(n)                                                                   \
  case n:                                                                                        \
    return LaunchDims<T, n>(q, k_pool, v_pool, block_tables, context_lens, shape, scale, rotary, \
                            out, stream);
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

const char* Run(const void* q, const void* k_pool, const void* v_pool, FloatKind kind,
                const int32_t* block_tables, const int32_t* context_lens,
                const PagedAttentionShape& shape, float scale, const PagedAttentionRotary& rotary,
                void* out, void* stream) {
  if (const char* bad = paged_attention_check(shape); bad[0] != '\0') return bad;
  if (shape.head_dim % 32 != 0 || shape.head_dim > kMaxHeadDim) {
    return "paged attention (CUDA): head_dim must be a multiple of 32, at most 256";
  }
  if (shape.rows > 0x7fffffff || shape.heads > 65535) {
    return "paged attention (CUDA): too many rows or heads for one launch";
  }
  if (shape.rows == 0) return nullptr;
  if ((reinterpret_cast<uintptr_t>(k_pool) | reinterpret_cast<uintptr_t>(v_pool)) % 16 != 0) {
    return "paged attention (CUDA): the key and value pools must be 16-byte aligned";
  }
  switch (kind) {
    case FloatKind::kF32:
      return Launch<float>(q, k_pool, v_pool, block_tables, context_lens, shape, scale, rotary, out,
                           stream);
    case FloatKind::kBF16:
      return Launch<__nv_bfloat16>(q, k_pool, v_pool, block_tables, context_lens, shape, scale,
                                   rotary, out, stream);
    case FloatKind::kF16:
      break;
  }
  return "paged attention (CUDA): q, k and v must be fp32 or bf16";
}

}  // namespace

const char* paged_attention_cuda(const void* q, const void* k_pool, const void* v_pool,
                                 FloatKind kind, const int32_t* block_tables,
                                 const int32_t* context_lens, const PagedAttentionShape& shape,
                                 float scale, void* out, void* stream) {
  return Run(q, k_pool, v_pool, kind, block_tables, context_lens, shape, scale,
             PagedAttentionRotary{}, out, stream);
}

const char* paged_attention_rotary_cuda(const void* q, void* k_pool, void* v_pool, FloatKind kind,
                                        const int32_t* block_tables, const int32_t* context_lens,
                                        const PagedAttentionShape& shape, float scale,
                                        const PagedAttentionRotary& rotary, void* out,
                                        void* stream) {
  if (rotary.k == nullptr || rotary.v == nullptr || rotary.cos == nullptr ||
      rotary.sin == nullptr || rotary.slots == nullptr) {
    return "paged attention (CUDA): the rotary needs k, v, cos, sin and slots";
  }
  return Run(q, k_pool, v_pool, kind, block_tables, context_lens, shape, scale, rotary, out,
             stream);
}

}  // namespace lorad::kernels
