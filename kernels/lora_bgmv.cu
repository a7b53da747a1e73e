// CUDA implementation of kernels/lora_bgmv.h. Raw pointers only: no torch headers here.
//
// Two launches, as Punica's shrink/expand, for up to kMaxLoraTargets projections of the same x at
// once (q, k and v; gate and up): the shrink computes t = A x in partial sums, one per
// kChunk-wide slice of in_features and one block per (row, slice, target), into an fp32 scratch;
// the expand adds those slices up (in slice order) for a tile of kTileRows rows and adds
// scale * B t to y. Each row reads its own adapter (rows of one adapter share it through the
// caches). The row -> adapter map is the only difference between BGMV (an index per row) and SGMV
// (a binary search over segment starts).
//
// Decode is latency-bound, not bandwidth-bound (rank-16 weights are a few hundred KB per
// projection): what counts is the number of dependent memory round trips. Before (one block per
// rank row looping over all of in_features, and a launch pair per projection) LoRA took 20 us per
// projection in the engine at batch 1, and at batch 1 an adapter cost 44% of the decode speed.
// Now the slices give many small blocks whose loads are independent, the sums of a row do not
// depend on the other rows (a request decodes the same alone or in any batch), the weights are
// read before the wait for the previous kernel, and both kernels are launched with programmatic
// dependent launch, so each starts while the kernel before it drains.
// Tried and reverted: both steps in one launch (the first blocks to take a ticket shrink, the
// rest expand once a counter says every shrink block is done). The q, k, v group took 13.1 us
// instead of 9.4 at batch 32 (6.5 instead of 3.8 at batch 1), and decoding at batch 32 on 4
// adapters fell from 3,957 to 3,652 tokens/s
// (bench/results/2026-12-02-h200-generation-8b-paged-attention-gqa.txt): the expand blocks spin
// on SMs the shrink needs, and the next kernel may only start once the counters are reset.
// Also tried and reverted (2026-12-04): both steps in one launch for up to 8 rows, a cluster of 8
// blocks per 2048 columns exchanging the partial sums through distributed shared memory (bit for
// bit these kernels' sums): a q, k, v group at batch 1 took 4.30 us instead of 3.44, and decoding
// at batch 1 on an adapter fell from 316.4 to 264.3 tokens/s
// (bench/results/2026-12-04-h200-generation-8b-ab-lora-one-launch-reverted.txt).
// Also tried and reverted: the shrink on a side stream (a branch of the decode graph) beside the
// base product, whose persistent grid leaves 4-36 SMs idle, and only the expand after it. In one
// run against the same engine with the shrink in line it was slower: batch 1 on one adapter 248.8
// against 257.4 tokens/s, batch 32 on one adapter 4,008 against 4,107, on 4 adapters 4,075
// against 4,086 (bench/results/2026-12-02-h200-generation-8b-lora-shrink-side-stream-reverted.txt).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/device_float.cuh"
#include "kernels/lora_bgmv.h"
#include "kernels/programmatic_launch.cuh"
#include "kernels/warp_reduce.cuh"

namespace lorad::kernels {
namespace {

constexpr int kTileRows = 8;         // rows per expand block
constexpr int kShrinkThreads = 256;  // 8 warps, each one rank row at a time
constexpr int kChunk = 512;          // in_features per shrink block: 16 elements per lane
constexpr int kExpandThreads = 256;  // output columns per expand block

int64_t Chunks(int64_t in_features) { return (in_features + kChunk - 1) / kChunk; }

struct IndexPerRow {  // BGMV
  const int32_t* adapter_index;
  __device__ int32_t operator()(int64_t row) const { return adapter_index[row]; }
};

struct Segments {  // SGMV: the last segment whose start is <= row
  const int64_t* starts;
  const int32_t* adapter;
  int64_t num_segments;
  __device__ int32_t operator()(int64_t row) const {
    int64_t lo = 0, hi = num_segments - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) >> 1;
      if (starts[mid] <= row) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return adapter[lo];
  }
};

// What both kernels know of a launch's targets (a kernel parameter, copied by value).
struct Targets {
  LoraTarget t[kMaxLoraTargets];
  int64_t partial_offset[kMaxLoraTargets];  // floats into the scratch, [chunks, rows, max_rank]
  int32_t
      first_column_block[kMaxLoraTargets + 1];  // expand blocks of target i: [first[i], first[i+1])
  int32_t count = 0;
  int32_t max_rank = 0;  // over the targets: sizes the expand's shared t
};

// The adapter slot of `row`, -1 for none (or a slot out of range).
template <typename AdapterOf>
__device__ __forceinline__ int32_t SlotOf(AdapterOf adapter_of, int64_t row, int64_t rows,
                                          int32_t num_slots) {
  const int32_t s = row < rows ? adapter_of(row) : -1;
  return s >= 0 && s < num_slots ? s : -1;
}

// Both kernels read what no kernel of a forward writes (the slots, the tables, the weights) before
// WaitForPredecessor, so under programmatic launch that overlaps the previous kernel's tail; only
// x, the partials and y are read after it.

// A lane's kPerLane elements of one row's chunk: with `vectorized` (in_features a multiple of
// 16 bytes' worth of elements and the row 16-byte aligned) 16-byte loads of consecutive
// elements, lane l taking vectors l, l + 32, ...; else single elements l, l + 32, ... Elements
// past in_features read as 0.
constexpr int kPerLane = kChunk / 32;
template <typename T>
__device__ __forceinline__ void LoadLaneSlice(const T* row, int64_t chunk0, int lane,
                                              int64_t in_features, bool vectorized, float* out) {
  if (vectorized) {
    constexpr int kVec = 16 / sizeof(T);
#pragma unroll
    for (int m = 0; m < kPerLane / kVec; ++m) {
      const int64_t k = chunk0 + (static_cast<int64_t>(m) * 32 + lane) * kVec;
      if (k < in_features) {
        LoadFloats<kVec>(row + k, out + m * kVec);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) out[m * kVec + e] = 0.f;
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int64_t k = chunk0 + lane + 32 * e;
      out[e] = k < in_features ? ToFloat(row[k]) : 0.f;
    }
  }
}

// grid: (rows, chunks, targets). Block (row, c, i) writes, if the row has an adapter s, for every
// r < rank[s]: partial[c][row][r] = sum over k in chunk c of A_s[r, k] x[row, k] (target i's A).
// Warp w takes the rank rows r = w, w + 8, ...; the lanes split the chunk (LoadLaneSlice), so a
// lane's loads are independent. A row per block (not a tile of rows): a decode row's sums are a
// handful of dependent memory round trips, not one per row.
// kVectorizable: in_features is a multiple of 16 bytes' worth of elements and x is 16-byte aligned
// (the launcher checks); each A is checked here.
template <typename T, bool kVectorizable, typename AdapterOf>
__global__ void __launch_bounds__(kShrinkThreads)
    lora_shrink_kernel(const T* __restrict__ x, int64_t rows, int64_t in_features,
                       AdapterOf adapter_of, Targets targets, float* __restrict__ scratch) {
  AllowDependents();
  constexpr int kWarps = kShrinkThreads / 32;
  const LoraAdapterTable& table = targets.t[blockIdx.z].table;
  const int64_t row = blockIdx.x;
  const int32_t s = SlotOf(adapter_of, row, rows, table.num_slots);
  if (s < 0) return;
  const int32_t rank = table.rank[s];
  const int warp = threadIdx.x >> 5;
  if (warp >= rank) return;
  const int lane = threadIdx.x & 31;
  const int64_t chunk0 = static_cast<int64_t>(blockIdx.y) * kChunk;
  const T* a = static_cast<const T*>(table.a[s]);
  const bool vec = kVectorizable && (reinterpret_cast<uintptr_t>(a) & 15) == 0;
  // The first two rank rows of this warp (all of them up to rank 16), before the wait.
  const int r1 = warp + kWarps;
  float a0[kPerLane], a1[kPerLane] = {};
  LoadLaneSlice(a + warp * in_features, chunk0, lane, in_features, vec, a0);
  if (r1 < rank) LoadLaneSlice(a + r1 * in_features, chunk0, lane, in_features, vec, a1);
  WaitForPredecessor();  // x is the predecessor's output
  float xv[kPerLane];
  LoadLaneSlice(x + row * in_features, chunk0, lane, in_features, vec, xv);
  float* partial = scratch + targets.partial_offset[blockIdx.z] +
                   (static_cast<int64_t>(blockIdx.y) * rows + row) * table.max_rank;
  float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    acc0 = fmaf(a0[e], xv[e], acc0);
    acc1 = fmaf(a1[e], xv[e], acc1);
  }
  acc0 = WarpSum(acc0);
  acc1 = WarpSum(acc1);
  if (lane == 0) {
    partial[warp] = acc0;
    if (r1 < rank) partial[r1] = acc1;
  }
  for (int r = r1 + kWarps; r < rank; r += kWarps) {  // ranks above 16
    float ar[kPerLane];
    LoadLaneSlice(a + r * in_features, chunk0, lane, in_features, vec, ar);
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc = fmaf(ar[e], xv[e], acc);
    acc = WarpSum(acc);
    if (lane == 0) partial[r] = acc;
  }
}

// B_s[o, :] . t in r order; R consecutive elements in the widest loads (b 16-byte aligned, as the
// row of a 16-byte aligned B is when R * sizeof(T) is a multiple of 16).
template <int R, typename T>
__device__ __forceinline__ float DotRow(const T* b, const float* t) {
  float bv[R];
  LoadFloats<R>(b, bv);
  float acc = 0.f;
#pragma unroll
  for (int r = 0; r < R; ++r) acc = fmaf(bv[r], t[r], acc);
  return acc;
}

template <typename T>
__device__ __forceinline__ float DotRow(const T* b, int32_t rank, bool aligned, const float* t) {
  if (aligned) {
    switch (rank) {
      case 8:
        return DotRow<8>(b, t);
      case 16:
        return DotRow<16>(b, t);
      case 32:
        return DotRow<32>(b, t);
      case 64:
        return DotRow<64>(b, t);
    }
  }
  float acc = 0.f;
  for (int r = 0; r < rank; ++r) acc = fmaf(ToFloat(b[r]), t[r], acc);
  return acc;
}

// t[r] of one row: the partial sums of chunks 0, 1, ... at p (stride apart) added in chunk order.
// kHeldChunks at a time, every load issued before the first add: down_proj's 28 chunks wait for two
// round trips to L2 instead of seven (four loads per unrolled group before); 32 at a time cost 20
// more registers.
constexpr int kHeldChunks = 16;
__device__ __forceinline__ float SumChunks(const float* p, int64_t chunks, int64_t stride) {
  float v = 0.f;
  for (int64_t c0 = 0; c0 < chunks; c0 += kHeldChunks) {
    const int64_t n = chunks - c0;
    float part[kHeldChunks];
#pragma unroll
    for (int c = 0; c < kHeldChunks; ++c) part[c] = c < n ? p[(c0 + c) * stride] : 0.f;
#pragma unroll
    for (int c = 0; c < kHeldChunks; ++c) {
      if (c < n) v += part[c];
    }
  }
  return v;
}

// grid: (tiles, column blocks of all targets). Block (tile, b) belongs to the target i with
// first_column_block[i] <= b < first_column_block[i + 1]; it sums the tile's t rows from the
// partials (chunk 0, 1, ... in order) into shared memory, then thread o adds
// scale * B_s[o, :] . t[row, :] to y[row, o] for every row of the tile with an adapter.
// kMinBlocks: the blocks per SM the registers must allow (__launch_bounds__). A grid that fits on
// the SMs at two blocks each takes 1 (the compiler keeps more loads in flight: ~120 registers);
// a larger one (gate/up at batch 32: 448 blocks) takes 4 (64 registers), so that it runs in one
// wave. Measured at batch 32 on 4 adapters (bench/lora_bgmv_bench, H200), against one build for
// all (76 registers): q/k/v 9.30 -> 8.04 us, gate/up 14.81 -> 10.77, down 11.23 -> 8.99
// (bench/results/2026-12-02-h200-lora_bgmv-expand-per-grid.txt).
// Loading every row's B before the first store (so none waits behind a store to y, which may
// alias B for the compiler) was measured slower at batch 1 (3.79 against 3.34 us).
template <typename T, typename AdapterOf, int kMinBlocks>
__global__ void __launch_bounds__(kExpandThreads, kMinBlocks)
    lora_expand_kernel(const float* __restrict__ scratch, int64_t rows, int64_t chunks,
                       AdapterOf adapter_of, Targets targets) {
  AllowDependents();
  extern __shared__ float t_tile[];  // [kTileRows, max_rank]
  int i = 0;
  while (i + 1 < targets.count &&
         static_cast<int32_t>(blockIdx.y) >= targets.first_column_block[i + 1]) {
    ++i;
  }
  const LoraTarget& target = targets.t[i];
  const LoraAdapterTable& table = target.table;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t o =
      static_cast<int64_t>(blockIdx.y - targets.first_column_block[i]) * kExpandThreads +
      threadIdx.x;
  const bool column = o < target.out_features;
  int32_t slot[kTileRows], rank[kTileRows];
  bool aligned[kTileRows];
  const T* b[kTileRows];
#pragma unroll
  for (int j = 0; j < kTileRows; ++j) {
    slot[j] = SlotOf(adapter_of, row0 + j, rows, table.num_slots);
    rank[j] = slot[j] >= 0 ? table.rank[slot[j]] : 0;
    b[j] = slot[j] >= 0 ? static_cast<const T*>(table.b[slot[j]]) + o * rank[j] : nullptr;
    aligned[j] = (reinterpret_cast<uintptr_t>(b[j]) & 15) == 0;
    // B_s[o, :] towards L2 while the partials are still being written.
    if (column && rank[j] > 0) asm volatile("prefetch.global.L2 [%0];" ::"l"(b[j]));
  }
  WaitForPredecessor();  // the partials, and y, are earlier kernels' outputs
  const float* partial = scratch + targets.partial_offset[i];
  const int32_t max_rank = table.max_rank;
  for (int e = threadIdx.x; e < kTileRows * max_rank; e += blockDim.x) {
    const int j = e / max_rank, r = e % max_rank;
    const int32_t s = SlotOf(adapter_of, row0 + j, rows, table.num_slots);
    t_tile[e] = s >= 0 && r < table.rank[s]
                    ? SumChunks(partial + (row0 + j) * max_rank + r, chunks, rows * max_rank)
                    : 0.f;
  }
  __syncthreads();
  if (!column) return;
  T* y = static_cast<T*>(target.y);
  float y_old[kTileRows];
#pragma unroll
  for (int j = 0; j < kTileRows; ++j) {
    y_old[j] = slot[j] >= 0 ? ToFloat(y[(row0 + j) * target.out_features + o]) : 0.f;
  }
#pragma unroll
  for (int j = 0; j < kTileRows; ++j) {
    if (slot[j] < 0) continue;
    const float acc = DotRow(b[j], rank[j], aligned[j], t_tile + j * max_rank);
    // Two roundings, as the CPU reference writes it (y + scale * acc).
    StoreAs(y + (row0 + j) * target.out_features + o,
            __fadd_rn(y_old[j], __fmul_rn(table.scale[slot[j]], acc)));
  }
}

template <typename T, typename AdapterOf>
const char* Launch(const T* x, int64_t rows, int64_t in_features, AdapterOf adapter_of,
                   const Targets& targets, float* scratch, cudaStream_t stream) {
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t chunks = Chunks(in_features);
  if (rows > 0x7fffffff || chunks > 65535) return "lora: too many rows or in_features";
  const dim3 shrink_grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks),
                         static_cast<unsigned>(targets.count));
  // 16-byte loads when every row of x starts 16-byte aligned (the kernel checks each A).
  const bool vectorized =
      in_features % (16 / sizeof(T)) == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;
  cudaError_t err = LaunchMaybeOverlapped(
      vectorized ? lora_shrink_kernel<T, true, AdapterOf> : lora_shrink_kernel<T, false, AdapterOf>,
      shrink_grid, dim3(kShrinkThreads), 0, stream, /*overlapped=*/true, x, rows, in_features,
      adapter_of, targets, scratch);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const dim3 expand_grid(static_cast<unsigned>(tiles),
                         static_cast<unsigned>(targets.first_column_block[targets.count]));
  const size_t shared = sizeof(float) * kTileRows * targets.max_rank;
  const bool one_wave_at_two = int64_t{expand_grid.x} * expand_grid.y <= 2 * int64_t{SmCount()};
  err = LaunchMaybeOverlapped(
      one_wave_at_two ? lora_expand_kernel<T, AdapterOf, 1> : lora_expand_kernel<T, AdapterOf, 4>,
      expand_grid, dim3(kExpandThreads), shared, stream,
      /*overlapped=*/true, static_cast<const float*>(scratch), rows, chunks, adapter_of, targets);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename AdapterOf>
const char* Dispatch(const void* x, FloatKind kind, int64_t rows, int64_t in_features,
                     AdapterOf adapter_of, const LoraTarget* list, int num_targets, void* scratch,
                     void* stream) {
  if (num_targets < 0 || num_targets > kMaxLoraTargets) return "lora: 0 to 3 targets per launch";
  if (rows <= 0 || in_features <= 0) return nullptr;  // nothing to add
  Targets targets;
  int64_t offset = 0;
  int64_t column_blocks = 0;
  for (int i = 0; i < num_targets; ++i) {
    const LoraTarget& t = list[i];
    if (t.out_features <= 0 || t.table.max_rank <= 0 || t.table.num_slots <= 0) continue;
    if (t.table.max_rank > 1024) return "lora: max_rank above 1024";
    const int c = targets.count++;
    targets.t[c] = t;
    targets.partial_offset[c] = offset;
    offset += Chunks(in_features) * rows * t.table.max_rank;
    targets.first_column_block[c] = static_cast<int32_t>(column_blocks);
    column_blocks += (t.out_features + kExpandThreads - 1) / kExpandThreads;
    if (column_blocks > 65535) return "lora: out_features too large for one launch";
    targets.max_rank = std::max(targets.max_rank, t.table.max_rank);
  }
  if (targets.count == 0) return nullptr;
  targets.first_column_block[targets.count] = static_cast<int32_t>(column_blocks);
  const auto s = static_cast<cudaStream_t>(stream);
  auto* partials = static_cast<float*>(scratch);
  switch (kind) {
    case FloatKind::kF32:
      return Launch(static_cast<const float*>(x), rows, in_features, adapter_of, targets, partials,
                    s);
    case FloatKind::kBF16:
      return Launch(static_cast<const __nv_bfloat16*>(x), rows, in_features, adapter_of, targets,
                    partials, s);
    case FloatKind::kF16:
      break;
  }
  return "lora: x must be fp32 or bf16";
}

}  // namespace

int64_t lora_scratch_bytes(int64_t rows, int64_t in_features, int64_t total_max_rank) {
  return static_cast<int64_t>(sizeof(float)) * Chunks(in_features) * rows * total_max_rank;
}

const char* lora_bgmv_cuda(const void* x, FloatKind kind, int64_t rows, int64_t in_features,
                           const int32_t* adapter_index, const LoraAdapterTable& table,
                           int64_t out_features, void* y, void* scratch, void* stream) {
  const LoraTarget target{table, out_features, y};
  return Dispatch(x, kind, rows, in_features, IndexPerRow{adapter_index}, &target, 1, scratch,
                  stream);
}

const char* lora_bgmv_group_cuda(const void* x, FloatKind kind, int64_t rows, int64_t in_features,
                                 const int32_t* adapter_index, const LoraTarget* targets,
                                 int num_targets, void* scratch, void* stream) {
  return Dispatch(x, kind, rows, in_features, IndexPerRow{adapter_index}, targets, num_targets,
                  scratch, stream);
}

const char* lora_sgmv_cuda(const void* x, FloatKind kind, int64_t rows, int64_t in_features,
                           const int64_t* segment_starts, const int32_t* segment_adapter,
                           int64_t num_segments, const LoraAdapterTable& table,
                           int64_t out_features, void* y, void* scratch, void* stream) {
  if (num_segments <= 0) return nullptr;
  const LoraTarget target{table, out_features, y};
  return Dispatch(x, kind, rows, in_features,
                  Segments{segment_starts, segment_adapter, num_segments}, &target, 1, scratch,
                  stream);
}

}  // namespace lorad::kernels
