// CUDA implementation of kernels/sampling.h. Raw pointers only: no torch headers here.
//
// The CPU reference is the specification and these kernels return its bits:
//   - each float operation is the one the reference does, through kernels/sampling_math.h
//     (explicitly rounded, never fused);
//   - everything order-dependent is an integer: token counts, fixed-point masses and their sums,
//     radix-select histograms, the draw's prefix sums;
//   - the reference's sorts become radix selects over order-preserving float keys (Key): the same
//     threshold without sorting the row.
// One CUDA block per row for warp, and a cluster of up to 8 per row for draw (sm_90; one block
// elsewhere): a decode batch has tens of rows, each a vocabulary of 32k-256k logits that stays in
// L2 between the passes.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "kernels/programmatic_launch.cuh"
#include "kernels/sampling.h"
#include "kernels/sampling_math.h"

namespace lorad::kernels {
namespace {

namespace sm = sampling_math;

constexpr int kRowThreads = 512;          // threads per row in warp and draw (1024 would spill)
constexpr unsigned kMaxDrawSplit = 8;     // blocks per row in draw (a portable cluster size)
constexpr int64_t kMaxDrawRows = 65535;   // draw's rows are its grid's y dimension
constexpr int kHistoryThreads = 256;      // threads per row in the penalty kernels
constexpr int32_t kPromptFlag = 1 << 30;  // scratch: the token occurs in the prompt
constexpr int32_t kCountMask = kPromptFlag - 1;  // scratch: occurrences among generated tokens

using BlockReduceU64 = cub::BlockReduce<unsigned long long, kRowThreads>;
using BlockReduceU32 = cub::BlockReduce<uint32_t, kRowThreads>;
using BlockScanU64 = cub::BlockScan<unsigned long long, kRowThreads>;

// cub::Max is gone from CCCL 3 (cuda::maximum replaces it); this works with either.
struct MaxOf {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a < b ? b : a;
  }
};

__device__ __forceinline__ bool HasPenalty(const SamplingRow& r) {
  return r.repetition_penalty != 1.0f || r.presence_penalty != 0.0f || r.frequency_penalty != 0.0f;
}

// Pass 1: scratch[t] = kPromptFlag if t is in the prompt | occurrences among generated tokens.
__global__ void __launch_bounds__(kHistoryThreads)
    count_history_kernel(int64_t vocab, const SamplingRow* __restrict__ rows, TokenHistory history,
                         int32_t* __restrict__ scratch) {
  const int64_t b = blockIdx.x;
  if (!HasPenalty(rows[b])) return;
  int32_t* counts = scratch + b * vocab;
  const int64_t generated = history.generated_begin[b];
  for (int64_t i = history.row_begin[b] + threadIdx.x; i < history.row_begin[b + 1];
       i += blockDim.x) {
    const int32_t t = history.tokens[i];
    if (t < 0 || t >= vocab) continue;
    if (i < generated) {
      atomicOr(&counts[t], kPromptFlag);
    } else {
      atomicAdd(&counts[t], 1);
    }
  }
}

// Pass 2: the first position of each distinct token to swap its scratch entry for 0 applies the
// penalty (once per token, as the reference's map does); the scratch ends all zero.
__global__ void __launch_bounds__(kHistoryThreads)
    apply_penalties_kernel(float* __restrict__ logits, int64_t vocab,
                           const SamplingRow* __restrict__ rows, TokenHistory history,
                           int32_t* __restrict__ scratch) {
  const int64_t b = blockIdx.x;
  const SamplingRow row = rows[b];
  if (!HasPenalty(row)) return;
  int32_t* counts = scratch + b * vocab;
  float* x = logits + b * vocab;
  for (int64_t i = history.row_begin[b] + threadIdx.x; i < history.row_begin[b + 1];
       i += blockDim.x) {
    const int32_t t = history.tokens[i];
    if (t < 0 || t >= vocab) continue;
    const int32_t entry = atomicExch(&counts[t], 0);
    if (entry == 0) continue;  // another position of the same token applied it
    const int32_t c = entry & kCountMask;
    float v = x[t];
    v = v < 0.0f ? sm::Mul(v, row.repetition_penalty) : sm::Div(v, row.repetition_penalty);
    if (c > 0) {
      v = sm::Sub(sm::Sub(v, sm::Mul(row.frequency_penalty, static_cast<float>(c))),
                  row.presence_penalty);
    }
    x[t] = v;
  }
}

// Shared memory of the row kernels: one reduction's scratch at a time, plus the radix histogram.
struct RowShared {
  union {
    typename BlockReduceU64::TempStorage reduce64;
    typename BlockReduceU32::TempStorage reduce32;
    typename BlockScanU64::TempStorage scan64;
  };
  unsigned long long histogram[256];
  unsigned long long u64;
  uint32_t u32;
};

__device__ uint32_t MaxKey(const float* x, int64_t vocab, RowShared& s) {
  uint32_t best = 0;  // below every key of a non-NaN float
  for (int64_t j = threadIdx.x; j < vocab; j += kRowThreads) best = max(best, sm::Key(x[j]));
  const uint32_t m = BlockReduceU32(s.reduce32).Reduce(best, MaxOf());
  if (threadIdx.x == 0) s.u32 = m;
  __syncthreads();
  const uint32_t result = s.u32;
  __syncthreads();
  return result;
}

// The smallest key t with sum(weight(x[j]) : Key(x[j]) <= t) > threshold, which the caller
// guarantees exists (threshold < the total weight): 4 passes of an 8-bit radix select. Integer
// weights make every histogram exact, so the result is the reference's sorted-walk result.
template <typename Weight>
__device__ uint32_t SelectKey(const float* x, int64_t vocab, unsigned long long threshold,
                              Weight weight, RowShared& s) {
  uint32_t prefix = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const uint32_t high_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
    for (int d = threadIdx.x; d < 256; d += kRowThreads) s.histogram[d] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < vocab; j += kRowThreads) {
      const uint32_t key = sm::Key(x[j]);
      if ((key & high_mask) != prefix) continue;
      const unsigned long long w = weight(x[j]);
      if (w != 0) atomicAdd(&s.histogram[(key >> shift) & 0xffu], w);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long below = 0;
      uint32_t digit = 255;
      for (uint32_t d = 0; d < 256; ++d) {
        if (below + s.histogram[d] > threshold) {
          digit = d;
          break;
        }
        below += s.histogram[d];
      }
      s.u64 = threshold - below;
      s.u32 = prefix | (digit << shift);
    }
    __syncthreads();
    threshold = s.u64;
    prefix = s.u32;
    __syncthreads();
  }
  return prefix;
}

__device__ void RemoveBelowKey(float* x, int64_t vocab, uint32_t cut) {
  for (int64_t j = threadIdx.x; j < vocab; j += kRowThreads) {
    if (sm::Key(x[j]) < cut) x[j] = -INFINITY;
  }
  __syncthreads();
}

__device__ unsigned long long TotalMass(const float* x, int64_t vocab, float m, RowShared& s) {
  unsigned long long sum = 0;
  for (int64_t j = threadIdx.x; j < vocab; j += kRowThreads) sum += sm::Mass(sm::Sub(x[j], m));
  const unsigned long long total = BlockReduceU64(s.reduce64).Sum(sum);
  if (threadIdx.x == 0) s.u64 = total;
  __syncthreads();
  const unsigned long long result = s.u64;
  __syncthreads();
  return result;
}

__global__ void __launch_bounds__(kRowThreads)
    warp_kernel(float* __restrict__ logits, int64_t vocab, const SamplingRow* __restrict__ rows) {
  __shared__ RowShared s;
  const SamplingRow row = rows[blockIdx.x];
  if (!(row.temperature > 0.0f)) return;  // greedy
  float* x = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  for (int64_t j = threadIdx.x; j < vocab; j += kRowThreads) x[j] = sm::Div(x[j], row.temperature);
  __syncthreads();

  if (row.top_k > 0 && row.top_k < vocab) {
    // The k-th largest value is the smallest key with more than vocab - k values at or below it.
    const uint32_t cut = SelectKey(
        x, vocab, static_cast<unsigned long long>(vocab - row.top_k), [](float) { return 1ull; },
        s);
    RemoveBelowKey(x, vocab, cut);
  }
  if (row.top_p < 1.0f) {
    const uint32_t max_key = MaxKey(x, vocab, s);
    const float m = sm::KeyFloat(max_key);
    const unsigned long long total = TotalMass(x, vocab, m, s);
    const unsigned long long threshold = sm::TopPThreshold(row.top_p, total);
    const uint32_t cut =
        threshold < total
            ? SelectKey(
                  x, vocab, threshold, [m](float v) { return sm::Mass(sm::Sub(v, m)); }, s)
            : max_key;
    RemoveBelowKey(x, vocab, cut);
  }
  if (row.min_p > 0.0f) {
    const float m = sm::KeyFloat(MaxKey(x, vocab, s));
    for (int64_t j = threadIdx.x; j < vocab; j += kRowThreads) {
      if (sm::ExpNonPositive(sm::Sub(x[j], m)) < row.min_p) x[j] = -INFINITY;
    }
  }
}

// The row's blocks in draw: a cluster of gridDim.x blocks (sm_90), or one block. The barrier
// makes every block's shared-memory writes before it visible to the others (and waits for all).
__device__ __forceinline__ void SyncRow() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (gridDim.x > 1) {
    cooperative_groups::this_cluster().sync();
    return;
  }
#endif
  __syncthreads();
}

// `*value` as block `rank` of the row holds it (its shared memory).
template <typename V>
__device__ __forceinline__ V ReadFromBlock(V* value, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (gridDim.x > 1) return *cooperative_groups::this_cluster().map_shared_rank(value, rank);
#endif
  (void)rank;
  return *value;
}

// One row per cluster of gridDim.x blocks (grid: split x batch), each block a contiguous slice of
// the row in id order; the blocks exchange their argmax candidates and their masses through
// distributed shared memory. A row of 128k logits read by one block took 15.4 us at batch 1 (one
// SM's bandwidth); split over 8 SMs 6.0 us (ncu, H200; bench/results/
// 2026-12-04-h200-generation-8b-ab-sampler-clusters.txt). Every value combined is an integer
// (packed keys, fixed-point masses), so the split changes no result.
__global__ void __launch_bounds__(kRowThreads)
    draw_kernel(const float* __restrict__ logits, int64_t vocab,
                const SamplingRow* __restrict__ rows, int32_t* __restrict__ tokens) {
  __shared__ RowShared s;
  __shared__ unsigned long long s_best, s_mass;  // this block's, read by the row's others
  const int64_t b = blockIdx.y;
  const unsigned split = gridDim.x, rank = blockIdx.x;
  const SamplingRow row = rows[b];
  const float* x = logits + b * vocab;
  // A row of 16-byte aligned float4s (vocab % 4 == 0, as 32000 and 128256) is read 4 logits a
  // load, and its slices are whole float4s.
  const bool by_float4 = vocab % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const int64_t unit = by_float4 ? 4 : 1, units = vocab / unit;
  const int64_t begin = rank * units / split * unit, end = (rank + 1) * units / split * unit;

  // Argmax with the lowest id among ties: the max of (key, ~id) packed into 64 bits. kArgmaxLoads
  // loads in flight per thread before the first compare (one at a time left a block waiting on
  // L2).
  constexpr int kArgmaxLoads = 8;
  unsigned long long best = 0;
  const auto consider = [&best](float v, int64_t j) {
    const unsigned long long packed = (static_cast<unsigned long long>(sm::Key(v)) << 32) |
                                      (0xffffffffu - static_cast<uint32_t>(j));
    best = max(best, packed);
  };
  if (by_float4) {
    const int64_t q_end = end / 4;
    for (int64_t base = begin / 4; base < q_end; base += int64_t{kArgmaxLoads} * kRowThreads) {
      float4 v[kArgmaxLoads];
#pragma unroll
      for (int u = 0; u < kArgmaxLoads; ++u) {
        const int64_t q = base + u * kRowThreads + threadIdx.x;
        v[u] = q < q_end ? reinterpret_cast<const float4*>(x)[q] : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < kArgmaxLoads; ++u) {
        const int64_t q = base + u * kRowThreads + threadIdx.x;
        if (q >= q_end) break;
        consider(v[u].x, 4 * q), consider(v[u].y, 4 * q + 1);
        consider(v[u].z, 4 * q + 2), consider(v[u].w, 4 * q + 3);
      }
    }
  } else {
    for (int64_t base = begin; base < end; base += int64_t{kArgmaxLoads} * kRowThreads) {
      float v[kArgmaxLoads];
#pragma unroll
      for (int u = 0; u < kArgmaxLoads; ++u) {
        const int64_t j = base + u * kRowThreads + threadIdx.x;
        v[u] = j < end ? x[j] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kArgmaxLoads; ++u) {
        const int64_t j = base + u * kRowThreads + threadIdx.x;
        if (j >= end) break;
        consider(v[u], j);
      }
    }
  }
  best = BlockReduceU64(s.reduce64).Reduce(best, MaxOf());  // valid in thread 0 only
  if (threadIdx.x == 0) s_best = best;
  SyncRow();  // every block's candidate is written
  unsigned long long row_best = 0;
  for (unsigned r = 0; r < split; ++r) row_best = max(row_best, ReadFromBlock(&s_best, r));
  const uint32_t max_key = static_cast<uint32_t>(row_best >> 32);
  const auto argmax = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(row_best));

  if (!(row.temperature > 0.0f)) {
    if (rank == 0 && threadIdx.x == 0) tokens[b] = argmax;
    SyncRow();  // no block leaves while another still reads its candidate
    return;
  }
  // w[j] = Mass(x[j] - max): this slice's sum, then the row's total and the sum of the slices
  // before this one.
  const float m = sm::KeyFloat(max_key);
  unsigned long long mass = 0;
  for (int64_t j = begin + threadIdx.x; j < end; j += kRowThreads) {
    mass += sm::Mass(sm::Sub(x[j], m));
  }
  mass = BlockReduceU64(s.reduce64).Sum(mass);  // valid in thread 0 only
  if (threadIdx.x == 0) s_mass = mass;
  SyncRow();  // every block's mass is written (and every candidate read)
  unsigned long long total = 0, before = 0;
  for (unsigned r = 0; r < split; ++r) {
    const unsigned long long v = ReadFromBlock(&s_mass, r);
    total += v;
    before += r < rank ? v : 0ull;
  }
  const unsigned long long mine = s_mass;
  SyncRow();         // every mass read: from here on no block reads another's shared memory
  if (total == 0) {  // no finite logit: the argmax, as for greedy rows
    if (rank == 0 && threadIdx.x == 0) tokens[b] = argmax;
    return;
  }
  const unsigned long long u = sm::ScaleDraw(sm::DrawBits(row.seed, row.step), total);
  if (u < before || u - before >= mine) return;  // the crossing is in another block's slice
  // The lowest id whose inclusive prefix mass exceeds u, one chunk of the slice at a time.
  for (int64_t base = begin; base < end; base += kRowThreads) {
    const int64_t j = base + threadIdx.x;
    const unsigned long long w = j < end ? sm::Mass(sm::Sub(x[j], m)) : 0ull;
    unsigned long long inclusive, chunk_total;
    BlockScanU64(s.scan64).InclusiveSum(w, inclusive, chunk_total);
    if (before + inclusive > u && before + inclusive - w <= u) {
      tokens[b] = static_cast<int32_t>(j);  // exactly one thread: the crossing is unique
    }
    if (before + chunk_total > u) break;  // uniform: every thread holds the same totals
    before += chunk_total;
    __syncthreads();  // the scan storage is reused
  }
}

const char* LastError() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* sampling_penalties_cuda(float* logits, int64_t batch, int64_t vocab,
                                    const SamplingRow* rows, const TokenHistory& history,
                                    int32_t* scratch, void* stream) {
  if (batch <= 0 || vocab <= 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  count_history_kernel<<<static_cast<unsigned>(batch), kHistoryThreads, 0, s>>>(vocab, rows,
                                                                                history, scratch);
  apply_penalties_kernel<<<static_cast<unsigned>(batch), kHistoryThreads, 0, s>>>(
      logits, vocab, rows, history, scratch);
  return LastError();
}

const char* sampling_warp_cuda(float* logits, int64_t batch, int64_t vocab, const SamplingRow* rows,
                               void* stream) {
  if (batch <= 0 || vocab <= 0) return nullptr;
  warp_kernel<<<static_cast<unsigned>(batch), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      logits, vocab, rows);
  return LastError();
}

const char* sampling_draw_cuda(const float* logits, int64_t batch, int64_t vocab,
                               const SamplingRow* rows, int32_t* tokens, void* stream) {
  if (batch <= 0 || vocab <= 0) return nullptr;
  if (batch > kMaxDrawRows) return "sampling_draw_cuda: more than 65535 rows in one launch";
  static const bool clustered = HasClusterCode(draw_kernel);
  // Blocks per row: up to kMaxDrawSplit while the grid stays within two blocks an SM.
  unsigned split = 1;
  while (clustered && split < kMaxDrawSplit && batch * split * 2 <= 2 * SmCount()) split *= 2;
  const auto launch = [&](unsigned blocks_per_row) {
    return LaunchInClusters(draw_kernel, dim3(blocks_per_row, static_cast<unsigned>(batch)),
                            dim3(kRowThreads), dim3(blocks_per_row, 1, 1), 0,
                            static_cast<cudaStream_t>(stream), /*overlapped=*/false, logits, vocab,
                            rows, tokens);
  };
  cudaError_t err = launch(split);
  if (err != cudaSuccess && split > 1) {  // clusters refused: one block a row
    cudaGetLastError();
    err = launch(1);
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace lorad::kernels
