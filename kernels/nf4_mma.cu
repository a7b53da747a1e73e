// CUDA implementation of kernels/nf4_mma.h. Raw pointers only: no torch headers here.
//
// Why tensor cores for a memory-bound product: nf4_gemv.cu spends about four issue slots per
// weight (decode one nibble, look it up, convert, multiply-add), which on an H200 is as long as
// the time HBM needs to deliver that weight, so it reached only 24-41% of the copy bandwidth. Here
//   - one PRMT turns a packed byte (two weights) plus the lane's offset into a shared-memory
//     address, and one LDS fetches both weights as a T pair ready for the tensor core: about one
//     instruction per weight. The 256-entry pair table is replicated once per lane (entry e of lane
//     l at byte e * 256 + 4 * l, so every lane always reads its own bank: no conflicts);
//   - mma.sync m16n8k16 does the multiply-adds (fp32 accumulation) for up to 8 rows of x per
//     tile, 32 with four tiles, so the same decode serves a whole decode batch;
//   - each warp streams its part of 16 rows (32 from 9 rows of x on: WarpTile) in stages of 2 KB
//     through a ring of shared-memory slots filled by cp.async (WarpTile::kStages: 2 for 16
//     rows, one stage in flight while one is decoded; 3 for 32 rows; no registers held for
//     them); the grid is persistent (one 16-warp block per SM) so the table is built once per
//     block, and each block's warps split the stages of its range of tiles evenly (a warp's
//     share may cross from one tile into the next);
//   - up to three weights sharing x (q, k, v; gate, up) run as one launch (TargetTable), each warp
//     tile within one weight: k's and v's 1024 rows alone would leave half the GPU idle;
//   - gate and up may end in the MLP's activation (TargetTable::silu_mul): their tiles
//     interleaved, each block sums both of a pair and writes silu(gate) * up, so neither output
//     reaches memory and no activation kernel follows (32 launches fewer a decode step).
//
// What was measured, tried and reverted (ring depth and order, L2 prefetch, LoRA in the
// epilogue, range splits, the shared-memory limit past which the SM's L1 shrinks) is in
// bench/results/nf4_mma-history.md. In short: batch 1 is latency-bound (4 warps per scheduler,
// short-scoreboard and MIO waits, DRAM about half busy), and more bytes in flight did not help;
// each batch-1 launch also pays about 3-4 us before and after its stream (its setup, the table,
// the sums; 2026-12-03-h200-nf4_mma-launch-timeline.txt, from the -DLORAD_NF4_MMA_TIMELINE build).
// The warp tile, its copies and its decode (the tensor-core fragment layout) are in
// nf4_mma_stage.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>

#include "kernels/async_copy.cuh"
#include "kernels/device_float.cuh"
#include "kernels/nf4_mma.h"
#include "kernels/nf4_mma_stage.cuh"
#include "kernels/nf4_mma_timeline.cuh"
#include "kernels/programmatic_launch.cuh"

namespace lorad::kernels {
namespace {

// The weights of one launch (one, or a group sharing x) and where each one's warp tiles end in
// the launch's tile order: tiles [tile_end[i - 1], tile_end[i]) belong to weight i.
// silu_mul: t[0] is gate and t[1] up (as many rows), their tiles interleaved (tile 2j is gate's
// tile j, 2j + 1 up's) and ranges cut between pairs, so one block sums both halves of a pair and
// writes silu(gate) * up to t[0].y: the MLP's activation without gate and up ever reaching memory.
struct TargetTable {
  Nf4MmaTarget t[kNf4MmaMaxTargets];
  int64_t tile_end[kNf4MmaMaxTargets];
  int count;
  int silu_mul;  // 0 or 1
};

// Tiles a range boundary may not split: the gate/up pairs of a silu_mul launch.
__device__ __host__ __forceinline__ int TilesPerGroup(const TargetTable& targets) {
  return targets.silu_mul ? 2 : 1;
}

__device__ __forceinline__ int TargetOf(const TargetTable& targets, int64_t tile) {
  if (targets.silu_mul) return static_cast<int>(tile & 1);
  int i = 0;
#pragma unroll
  for (int j = 0; j + 1 < kNf4MmaMaxTargets; ++j)
    i += (j + 1 < targets.count && tile >= targets.tile_end[j]);
  return i;
}

// field(targets.t[ti]), with every weight's field read at a fixed offset of the parameter bank
// and the one wanted selected, rather than read at an offset computed from ti: the reads no longer
// wait for ti (a launch's parameters are new to the SM's constant cache).
template <typename F>
__device__ __forceinline__ auto Pick(const TargetTable& targets, int ti, F field) {
  static_assert(kNf4MmaMaxTargets == 3, "one read per weight");
  const auto v0 = field(targets.t[0]), v1 = field(targets.t[1]), v2 = field(targets.t[2]);
  return ti == 0 ? v0 : (ti == 1 ? v1 : v2);
}

// Work split: the row tiles (of all the launch's weights, in order) are cut into `ranges`
// contiguous ranges of nearly equal length (at most RangeLayout::kMaxTiles tiles), block b taking
// ranges b, b + gridDim.x, ... A range of T tiles of S stages is T * S units of work (one stage of
// one tile), which the block's warps split evenly: warp w takes units [w U / 16, (w + 1) U / 16).
// Since a warp's share is at most S, it covers the end of one tile and the start of the next at
// most (two segments, each its own pipeline run). So every SM has work even where the tiles do not
// divide evenly among them (gate and up at batch 32: 896 tiles on 132 SMs, 6 or 7 per block, 14
// stages per warp; the earlier split into equal parts of a tile left 20 SMs idle and gave 16).
// A warp's partial sums go to its own ring when its last segment ends them, or to the boundary
// buffer of the tile when a second segment follows; then the block adds up each tile's
// contributions (in warp order, or by a shuffle tree where there are few sums) and writes y.
template <int NT, int MT>
struct RangeLayout {
  static constexpr int kCols = 8 * NT;
  static constexpr size_t kPartialBytes = sizeof(float) * WarpTile<MT>::kRows * kCols;
  static constexpr size_t kBaseBytes =
      kPairTableBytes + kNf4MmaMaxTargets * 256 * sizeof(float) + WarpTile<MT>::kRingBytes;
  static constexpr size_t kSharedLimit = 227 * 1024;  // an sm_90 block's opt-in maximum
  static constexpr int kMaxTiles =
      static_cast<int>(std::min<size_t>(kWarps, 1 + (kSharedLimit - kBaseBytes) / kPartialBytes));
  static constexpr size_t kSharedBytes = kBaseBytes + (kMaxTiles - 1) * kPartialBytes;
  static_assert(kMaxTiles >= 2, "boundary buffers fit");
};

// The tile of weight `ti` that launch tile `tile` is, as the row its warp tile starts at.
__device__ __forceinline__ int64_t FirstRowOf(const TargetTable& targets, int64_t tile, int ti,
                                              int rows_per_tile) {
  if (targets.silu_mul) return (tile >> 1) * rows_per_tile;
  return (tile - (ti == 0 ? 0 : (ti == 1 ? targets.tile_end[0] : targets.tile_end[1]))) *
         rows_per_tile;
}

template <typename T, int NT, int MT>
__global__ void __launch_bounds__(kThreads, 1)
    nf4_mma_kernel(const T* __restrict__ x, int64_t x_rows,
                   const __grid_constant__ TargetTable targets, int64_t in_features, int ranges) {
  using W = WarpTile<MT>;
  using L = RangeLayout<NT, MT>;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* table = smem;
  float* code2s = reinterpret_cast<float*>(smem + kPairTableBytes);  // [count][256]
  unsigned char* ring = smem + kPairTableBytes + kNf4MmaMaxTargets * 256 * sizeof(float);
  float* boundary = reinterpret_cast<float*>(ring + W::kRingBytes);  // [kMaxTiles - 1][rows][cols]
  constexpr int kCols = L::kCols;
  static_assert(L::kPartialBytes <= W::kStages * W::kSlotBytes, "partials fit a warp's ring");

  AllowDependents();
#if defined(LORAD_NF4_MMA_TIMELINE)
  __shared__ unsigned long long* timeline_holder;
  unsigned long long* const timeline_row = TimelineRow(&timeline_holder);
  if (threadIdx.x == 0) {
    LORAD_NF4_TIMELINE(kTimelineStartNs, GlobalTimer());
    LORAD_NF4_TIMELINE(kTimelineSm, SmId());
    LORAD_NF4_TIMELINE(kTimelineStart, clock64());
  }
  bool timeline_first_stage = true;
#endif
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const uint32_t lane_offset = 4u * lane;
  const int64_t blocks_per_row = in_features / 64;
  // Stages per tile; range-local unit and tile numbers are 32-bit (a range has at most 16
  // tiles), so the divisions below are cheap.
  const int stages = static_cast<int>(blocks_per_row / W::kStageBlocks);
  const int64_t row_tiles = targets.tile_end[targets.count - 1];
  unsigned char* my_ring = ring + warp * W::kStages * W::kSlotBytes;
  const uint32_t my_ring_address = SharedAddress(my_ring);

  // Lane (g, t)'s x rows 8 nt + g at weight 16 t; rows past x_rows read the last row (their
  // columns are never stored): no zeroing and no branch in the loop, and the 64-bit address
  // arithmetic done once here instead of for every block.
  const T* xrow[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    xrow[nt] = x + min(static_cast<int64_t>(8 * nt + g), x_rows - 1) * in_features + 16 * t;
  }
  TileCopy<MT> tc;
  tc.pieces.Init(in_features / 2);
  const int piece = lane % W::kPiecesPerRow, first_row = lane / W::kPiecesPerRow;
  tc.dst = first_row * W::kRowStride + W::BlockOffset(first_row, piece / 2) + (piece % 2) * 16;
  // Segment state: the tile's weight and the stage range [kb_begin, kb_end).
  int ti = 0;
  uint32_t kb_begin = 0, kb_end = 0;
  // Points tc and the segment state at units [u, u_end) of the range starting at tile t0 (all
  // within one tile).
  const auto begin_segment = [&](int64_t t0, int u, int u_end) {
    const int64_t tile = t0 + u / stages;
    ti = TargetOf(targets, tile);
    const int64_t row0 = FirstRowOf(targets, tile, ti, W::kRows);
    kb_begin = static_cast<uint32_t>(u % stages * W::kStageBlocks);
    kb_end = kb_begin + static_cast<uint32_t>(u_end - u) * W::kStageBlocks;
    const int64_t last_row =
        Pick(targets, ti, [](const Nf4MmaTarget& w) { return w.out_features; }) - 1;
    tc.pieces.Point(Pick(targets, ti, [](const Nf4MmaTarget& w) { return w.packed; }),
                    row0 + first_row, last_row, in_features / 2, piece);
    const int64_t scale_row = min(row0 + lane % W::kRows, last_row);
    tc.qabsmax = Pick(targets, ti, [](const Nf4MmaTarget& w) { return w.absmax.qabsmax; }) +
                 scale_row * blocks_per_row;
    tc.first_block = static_cast<uint32_t>(scale_row * blocks_per_row);
  };
  // The first kStages - 1 stages of the segment in flight (empty groups keep the count uniform).
  const auto prologue = [&] {
    const float* absmax2 =
        Pick(targets, ti, [](const Nf4MmaTarget& w) { return w.absmax.absmax2; });
#pragma unroll
    for (int s = 0; s < W::kStages - 1; ++s) {
      const uint32_t kb = kb_begin + s * W::kStageBlocks;
      if (kb < kb_end) CopyStage<MT>(tc, lane, kb, absmax2, my_ring_address + s * W::kSlotBytes);
      CommitCopies();
    }
  };
  bool first = true;
#pragma unroll 1
  for (int64_t range = blockIdx.x; range < ranges; range += gridDim.x) {
    // Ranges of whole groups (gate/up pairs); shifts, not divisions, by the group size.
    const int per_group = TilesPerGroup(targets), group_shift = per_group - 1;
    const int64_t groups = row_tiles >> group_shift;
    const int64_t t0 = (range * groups / ranges) << group_shift;
    const int64_t t1 = ((range + 1) * groups / ranges) << group_shift;
    const int tiles_here = static_cast<int>(t1 - t0);
    const int units = tiles_here * stages;
    const int u_begin = warp * units / kWarps, u_end = (warp + 1) * units / kWarps;
    // Segment 1 ends at the end of its tile or of the warp's share; segment 2 is the rest.
    const int u_split = min(u_end, (u_begin / stages + 1) * stages);
    const int segments = u_begin == u_end ? 0 : (u_split < u_end ? 2 : 1);
    if (threadIdx.x == 0) LORAD_NF4_TIMELINE(kTimelineRanged, clock64());
    if (segments > 0) {
      begin_segment(t0, u_begin, u_split);
      if (threadIdx.x == 0) LORAD_NF4_TIMELINE(kTimelinePointed, clock64());
      prologue();
    }
    if (threadIdx.x == 0) LORAD_NF4_TIMELINE(kTimelineIssued, clock64());
    if (first) {
      // The table and code2 are constant inputs: built while the first copies are in flight
      // and before the predecessor (which may write x) has finished. code2 comes by asynchronous
      // copies, whose round trip overlaps the table's build (read with plain loads after it, it
      // made each block wait about 0.5 us more).
      const auto code2_of = [](const Nf4MmaTarget& w) { return w.absmax.code2; };
      for (int i = threadIdx.x; i < 256 * targets.count; i += kThreads) {
        CopyAsync4(SharedAddress(code2s + i), Pick(targets, i / 256, code2_of) + i % 256);
      }
      CommitCopies();
      for (int e = warp; e < 256; e += kWarps) {
        *reinterpret_cast<uint32_t*>(table + e * 256 + lane_offset) =
            Pair<T>(kCodeDevice[e >> 4], kCodeDevice[e & 15]);
      }
      // Then every copy this thread issued has landed: code2, and the first stages the loop below
      // would wait for anyway.
      WaitCopies<0>();
      if (threadIdx.x == 0) LORAD_NF4_TIMELINE(kTimelineTableBuilt, clock64());
      WaitForPredecessor();
      if (threadIdx.x == 0) LORAD_NF4_TIMELINE(kTimelineWaited, clock64());
      __syncthreads();
      if (threadIdx.x == 0) LORAD_NF4_TIMELINE(kTimelineSynced, clock64());
      first = false;
    }
#pragma unroll 1
    for (int seg = 0; seg < segments; ++seg) {
      if (seg == 1) {
        begin_segment(t0, u_split, u_end);
        prologue();
      }
      const float* code2 = code2s + ti * 256;
      const float offset = targets.t[ti].absmax.offset;
      const float* absmax2 = targets.t[ti].absmax.absmax2;
      float acc[MT][NT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          acc[m][nt][0] = acc[m][nt][1] = acc[m][nt][2] = acc[m][nt][3] = 0.f;
        }
      }
      int slot = 0;
#pragma unroll 1
      for (uint32_t kb = kb_begin; kb < kb_end; kb += W::kStageBlocks) {
        WaitCopies<W::kStages - 2>();  // this stage's copies (this lane's) have landed
        __syncwarp();                  // ... and every lane's
#if defined(LORAD_NF4_MMA_TIMELINE)
        if (threadIdx.x == 0 && timeline_first_stage) {
          LORAD_NF4_TIMELINE(kTimelineFirstStage, clock64());
          timeline_first_stage = false;
        }
#endif
        // Refill the slot decoded in the previous iteration with the stage kStages - 1 ahead.
        // (Refilling the slot just decoded after its decode instead, with kStages stages in
        // flight while the warp waits, made the batch-1 layer 5% slower and batch-1 decode 4%:
        // 2026-12-03-h200-generation-8b-ab-refill-after-decode-reverted.txt.)
        const uint32_t ahead = kb + (W::kStages - 1) * W::kStageBlocks;
        const int refill = slot == 0 ? W::kStages - 1 : slot - 1;
        if (ahead < kb_end) {
          CopyStage<MT>(tc, lane, ahead, absmax2, my_ring_address + refill * W::kSlotBytes);
        }
        CommitCopies();
        ComputeStage<T, NT, MT>(my_ring + slot * W::kSlotBytes, table, code2, offset, lane_offset,
                                xrow, kb, g, t, acc);
        __syncwarp();  // every lane is done with the slot before it is refilled
        slot = slot == W::kStages - 1 ? 0 : slot + 1;
      }
      WaitCopies<0>();  // nothing in flight into the ring before it holds partial sums
      // Partial sums [W::kRows][kCols]: a first segment of two into its tile's boundary buffer,
      // the last one into the warp's own ring. Fragment element i of tile (m, nt): tile row
      // 16 m + g (+8 for i >= 2), column 8 nt + 2 t (+1 for odd i).
      float* mine = seg + 1 < segments ? boundary + (u_begin / stages) * (W::kRows * kCols)
                                       : reinterpret_cast<float*>(my_ring);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            mine[(16 * m + g + (i >= 2 ? 8 : 0)) * kCols + 8 * nt + 2 * t + (i & 1)] =
                acc[m][nt][i];
          }
        }
      }
      __syncwarp();
    }
    if (lane == 0) LORAD_NF4_TIMELINE(kTimelineWarpDone + warp, clock64());
    __syncthreads();
    if (threadIdx.x == 0) LORAD_NF4_TIMELINE(kTimelineReduce, clock64());
    // Warp w's partial sums for tile `local`, or nullptr where it has none. The tile's units are
    // [local S, (local + 1) S); warp w's share is [w U / 16, (w + 1) U / 16) (an empty one wrote
    // nothing); a share running past the tile's end left them in the tile's boundary buffer.
    const auto partials_of = [&](int local, int w) -> const float* {
      const int first_unit = local * stages, end_unit = first_unit + stages;
      const int w_begin = w * units / kWarps, w_end = (w + 1) * units / kWarps;
      if (w_begin >= end_unit || w_end <= first_unit || w_begin == w_end) return nullptr;
      return w_end > end_unit
                 ? boundary + local * (W::kRows * kCols)
                 : reinterpret_cast<const float*>(ring + w * W::kStages * W::kSlotBytes);
    };
    // Tile `local`'s sum at (r, col): the warps' contributions added in warp order.
    const auto tile_sum = [&](int local, int r, int col) {
      const int first_unit = local * stages, end_unit = first_unit + stages;
      float v = 0.f;
      for (int w = first_unit * kWarps / units; w < kWarps && w * units / kWarps < end_unit; ++w) {
        if (const float* part = partials_of(local, w)) v += part[r * kCols + col];
      }
      return v;
    };
    const int cols = static_cast<int>(x_rows < kCols ? x_rows : kCols);
    const int sums = (tiles_here >> group_shift) * W::kRows * cols;  // y values (or pairs) to write
    const bool summed = NT == 1 && sums <= 4 * kWarps;
    if (summed) {
      // Few sums (batch 1 apart from gate/up: 16-64 a block): a half-warp per (tile, row, column),
      // its lane h reading warp h's contribution and a shuffle tree adding them, so a sum is four
      // dependent adds, not a loop over 16 warps: it took this phase of a batch-1 launch from
      // about 1.0-1.4 us to 0.6-1.0. With more sums (gate/up, batch 8) the warps' many rounds cost
      // more than the loop (gate/up at batch 8: 18.4 -> 28.5 us).
      const int h = lane & 15;
      const auto tile_sum_by_halves = [&](int local, int r, int col) {
        const float* part = partials_of(local, h);
        float v = part != nullptr ? part[r * kCols + col] : 0.f;
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        return v;
      };
      // Both halves of a warp run every iteration (the shuffles need all 32 lanes).
      for (int pair = 2 * warp; pair < sums; pair += 2 * kWarps) {
        const int item = min(pair + (lane >> 4), sums - 1);
        const int col = item % cols, r = item / cols % W::kRows;
        const int local = item / (cols * W::kRows) << group_shift;
        const int64_t tile = t0 + local;
        const int their_ti = TargetOf(targets, tile);
        const int64_t out_features =
            Pick(targets, their_ti, [](const Nf4MmaTarget& w) { return w.out_features; });
        const int64_t row = FirstRowOf(targets, tile, their_ti, W::kRows) + r;
        T* y = static_cast<T*>(Pick(targets, their_ti, [](const Nf4MmaTarget& w) { return w.y; })) +
               col * out_features + row;
        const bool store = h == 0 && pair + (lane >> 4) < sums && row < out_features;
        if (targets.silu_mul) {
          const float gate = tile_sum_by_halves(local, r, col);
          const float up = tile_sum_by_halves(local + 1, r, col);
          if (store) StoreAs(y, SiluTimes<T>(Round(gate, y), Round(up, y)));
        } else {
          const float v = tile_sum_by_halves(local, r, col);
          if (store) StoreAs(y, v);
        }
      }
    }
    // Else one thread per (tile or gate/up pair, row, column) (compile-time divisors: this runs
    // after every range).
    for (int idx = threadIdx.x; !summed && idx < (tiles_here >> group_shift) * W::kRows * kCols;
         idx += kThreads) {
      const int col = idx % kCols;
      if (col >= cols) continue;
      const int r = idx / kCols % W::kRows, local = idx / (kCols * W::kRows) << group_shift;
      const int64_t tile = t0 + local;
      const int their_ti = TargetOf(targets, tile);
      const Nf4MmaTarget& theirs = targets.t[their_ti];
      const int64_t row = FirstRowOf(targets, tile, their_ti, W::kRows) + r;
      if (row >= theirs.out_features) continue;
      T* y = static_cast<T*>(theirs.y) + col * theirs.out_features + row;
      if (targets.silu_mul) {
        // gate and up rounded to T as their own products would store them, then silu_mul.
        const float gate = Round(tile_sum(local, r, col), y);
        const float up = Round(tile_sum(local + 1, r, col), y);
        StoreAs(y, SiluTimes<T>(gate, up));
      } else {
        StoreAs(y, tile_sum(local, r, col));
      }
    }
    if (threadIdx.x == 0) LORAD_NF4_TIMELINE(kTimelineEnd, clock64());
    __syncthreads();  // the rings and boundary buffers are reused by the next range
  }
  if (threadIdx.x == 0) LORAD_NF4_TIMELINE(kTimelineEndNs, GlobalTimer());
}

// Per kernel instantiation: the shared-memory opt-in (once) and how many blocks fit on an SM.
template <typename T, int NT, int MT>
int ResidentBlocksPerSm() {
  static std::once_flag once;
  static int blocks = 0;
  std::call_once(once, [] {
    const auto kernel = nf4_mma_kernel<T, NT, MT>;
    constexpr size_t kShared = RangeLayout<NT, MT>::kSharedBytes;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kShared)) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, kShared) !=
            cudaSuccess) {
      cudaGetLastError();
      blocks = 0;
    }
  });
  return blocks;
}

// Whether every kernel LaunchTiles may pick for `rows` rows fits this device's shared memory: the
// layout is sized for sm_90's 227 KB a block; an A100 opts in to 163 KB (the kernels for 9 rows
// and more do not fit) and sm_86 / sm_89 cards to 99 KB (none does). Where one does not, the
// engine takes its other 4-bit products (nf4_mma_cuda_supports is false).
template <typename T>
bool FitsOnDevice(int64_t rows) {
  if (rows <= 8) return ResidentBlocksPerSm<T, 1, 1>() > 0;
  if (rows <= 16) return ResidentBlocksPerSm<T, 2, 2>() > 0 && ResidentBlocksPerSm<T, 2, 1>() > 0;
  return ResidentBlocksPerSm<T, 4, 2>() > 0 && ResidentBlocksPerSm<T, 4, 1>() > 0;
}

// The ranges of a launch on `blocks` blocks (the resident ones for the planner's grid): one per
// block (or per tile, when there are fewer tiles), more in rounds of that many when a range would
// pass kMaxTiles tiles.
// Ranges are cut between groups of per_group tiles (a silu_mul launch's gate/up pairs).
template <int NT, int MT>
int64_t PlanRanges(int64_t row_tiles, int64_t blocks_wanted, int per_group) {
  const int64_t groups = row_tiles / per_group;
  const int64_t blocks = std::min(groups, blocks_wanted);
  const int64_t per_round = blocks * (RangeLayout<NT, MT>::kMaxTiles / per_group);
  return blocks * ((groups + per_round - 1) / per_round);
}

// The launch's weights in tile order, with MT * 16-row tiles.
template <int MT>
TargetTable TableOf(const Nf4MmaTarget* targets, int count, bool silu_mul) {
  TargetTable table{};
  table.count = count;
  table.silu_mul = silu_mul ? 1 : 0;
  int64_t tiles = 0;
  for (int i = 0; i < count; ++i) {
    table.t[i] = targets[i];
    tiles += (targets[i].out_features + WarpTile<MT>::kRows - 1) / WarpTile<MT>::kRows;
    table.tile_end[i] = tiles;
  }
  return table;
}

// The boundary buffers a launch needs: a range of T tiles needs T - 1 when some warp's share
// crosses a tile's end, none otherwise (ranges have row_tiles / ranges tiles, or one more). A
// launch only asks for the shared memory it uses: beyond 195 KB the SM keeps 28 KB of L1 for the
// x loads instead of 60 (measured: 10-20% slower on the shapes that need no boundary buffer).
int BoundaryBuffers(int64_t row_tiles, int64_t ranges, int64_t stages, int per_group) {
  int buffers = 0;
  const int64_t groups = row_tiles / per_group, q = groups / ranges;
  for (int64_t tiles = q * per_group; tiles <= (q + 1) * per_group; tiles += per_group) {
    if (tiles == 0 || (tiles > q * per_group && groups % ranges == 0)) continue;
    const int64_t units = tiles * stages;
    for (int w = 0; w < kWarps; ++w) {
      const int64_t begin = w * units / kWarps, end = (w + 1) * units / kWarps;
      if (begin < end && begin / stages != (end - 1) / stages) {
        buffers = std::max(buffers, static_cast<int>(tiles - 1));
      }
    }
  }
  return buffers;
}

// blocks: 0 for the planner's grid, else that many blocks (each range at most kMaxTiles tiles).
template <typename T, int NT, int MT>
const char* LaunchTyped(int64_t blocks, const void* x, int64_t rows, const Nf4MmaTarget* targets,
                        int count, bool silu_mul, int64_t in_features, cudaStream_t stream,
                        bool overlapped) {
  using L = RangeLayout<NT, MT>;
  const int per_sm = ResidentBlocksPerSm<T, NT, MT>();
  if (per_sm <= 0) return "nf4_mma_cuda: the kernel does not fit on this device";
  const int64_t resident = static_cast<int64_t>(per_sm) * SmCount();
  const TargetTable table = TableOf<MT>(targets, count, silu_mul);
  const int per_group = TilesPerGroup(table);
  const int64_t row_tiles = table.tile_end[count - 1];
  const int64_t ranges = PlanRanges<NT, MT>(row_tiles, blocks == 0 ? resident : blocks, per_group);
  if (ranges > 0x7fffffff) return "nf4_mma_cuda: too many row tiles";
  const dim3 grid(static_cast<unsigned>(std::min(ranges, resident)));
  const int64_t stages = in_features / 64 / WarpTile<MT>::kStageBlocks;
  const size_t shared =
      L::kBaseBytes + BoundaryBuffers(row_tiles, ranges, stages, per_group) * L::kPartialBytes;
  const cudaError_t err = LaunchMaybeOverlapped(
      nf4_mma_kernel<T, NT, MT>, grid, dim3(kThreads), shared, stream, overlapped,
      static_cast<const T*>(x), rows, table, in_features, static_cast<int>(ranges));
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Up to 8 rows of x: one tensor-core tile of W per warp (MT = 1). More: two (MT = 2), which
// halves the x loads, where the 32-row tiles still give at least one block per two SMs; with
// fewer (k/v_proj's 1024 rows alone: 32 tiles) half the GPU would idle, so those keep MT = 1.
template <typename T>
const char* LaunchTiles(int64_t blocks, const void* x, int64_t rows, const Nf4MmaTarget* targets,
                        int count, bool silu_mul, int64_t in_features, cudaStream_t stream,
                        bool overlapped) {
  int64_t tiles32 = 0;
  for (int i = 0; i < count; ++i) {
    tiles32 += (targets[i].out_features + WarpTile<2>::kRows - 1) / WarpTile<2>::kRows;
  }
  const bool two_tiles = tiles32 * 2 >= SmCount();
#define LORAD_NF4_MMA_LAUNCH(NT, MT)                                                            \
  return LaunchTyped<T, NT, MT>(blocks, x, rows, targets, count, silu_mul, in_features, stream, \
                                overlapped)
  if (rows <= 8) LORAD_NF4_MMA_LAUNCH(1, 1);
  if (rows <= 16) {
    if (two_tiles) LORAD_NF4_MMA_LAUNCH(2, 2);
    LORAD_NF4_MMA_LAUNCH(2, 1);
  }
  if (two_tiles) LORAD_NF4_MMA_LAUNCH(4, 2);
  LORAD_NF4_MMA_LAUNCH(4, 1);
#undef LORAD_NF4_MMA_LAUNCH
}

const char* Run(int64_t blocks, const void* x, FloatKind kind, int64_t rows,
                const Nf4MmaTarget* targets, int count, bool silu_mul, int64_t in_features,
                void* stream, bool overlapped) {
  if (!nf4_mma_cuda_supports(rows, in_features, kind)) {
    return "nf4_mma_cuda: unsupported problem (needs bf16 or fp16 x, 1..32 rows and "
           "in_features a multiple of 256 below 2^32 / 12)";
  }
  if (blocks < 0) return "nf4_mma_cuda: blocks must be 0 (the planner's) or more";
  if (count < 1 || count > kNf4MmaMaxTargets) {
    return "nf4_mma_group_cuda: count must be 1 .. kNf4MmaMaxTargets (3)";
  }
  // Weights without rows take no tiles: drop them.
  Nf4MmaTarget kept[kNf4MmaMaxTargets];
  int n = 0;
  for (int i = 0; i < count; ++i) {
    if (targets[i].out_features > 0) kept[n++] = targets[i];
    // TileCopy's 32-bit block numbers (its row offsets: in_features below 2^32 / 12, above).
    if (targets[i].out_features * (in_features / 64) >= (int64_t{1} << 32)) {
      return "nf4_mma_cuda: weight too large (out_features * in_features / 64 must be below 2^32)";
    }
  }
  if (n == 0) return nullptr;
  if (silu_mul && (count != 2 || targets[0].out_features != targets[1].out_features)) {
    return "nf4_mma_silu_mul_cuda: gate and up must have as many rows";
  }
  const auto s = static_cast<cudaStream_t>(stream);
  if (kind == FloatKind::kBF16) {
    return LaunchTiles<__nv_bfloat16>(blocks, x, rows, kept, n, silu_mul, in_features, s,
                                      overlapped);
  }
  return LaunchTiles<__half>(blocks, x, rows, kept, n, silu_mul, in_features, s, overlapped);
}

Nf4MmaTarget Single(const uint8_t* packed, const Nf4Absmax& absmax, int64_t out_features, void* y) {
  Nf4MmaTarget target;
  target.packed = packed;
  target.absmax = absmax;
  target.out_features = out_features;
  target.y = y;
  return target;
}

}  // namespace

bool nf4_mma_cuda_supports(int64_t rows, int64_t in_features, FloatKind kind) {
  const bool shape = (kind == FloatKind::kBF16 || kind == FloatKind::kF16) && rows >= 1 &&
                     rows <= kNf4MmaMaxRows && in_features > 0 && in_features % 256 == 0 &&
                     // TileCopy's 32-bit row offsets span up to 24 rows of in_features / 2 bytes.
                     12 * in_features < (int64_t{1} << 32);
  if (!shape) return false;
  return kind == FloatKind::kBF16 ? FitsOnDevice<__nv_bfloat16>(rows) : FitsOnDevice<__half>(rows);
}

const char* nf4_mma_cuda(const void* x, FloatKind kind, int64_t rows, const uint8_t* packed,
                         const Nf4Absmax& absmax, int64_t out_features, int64_t in_features,
                         void* y, void* stream, bool overlapped) {
  const Nf4MmaTarget target = Single(packed, absmax, out_features, y);
  return Run(0, x, kind, rows, &target, 1, false, in_features, stream, overlapped);
}

const char* nf4_mma_group_cuda(const void* x, FloatKind kind, int64_t rows,
                               const Nf4MmaTarget* targets, int count, int64_t in_features,
                               void* stream, bool overlapped) {
  return Run(0, x, kind, rows, targets, count, false, in_features, stream, overlapped);
}

const char* nf4_mma_silu_mul_cuda(const void* x, FloatKind kind, int64_t rows,
                                  const Nf4MmaTarget& gate, const Nf4MmaTarget& up,
                                  int64_t in_features, void* out, void* stream, bool overlapped,
                                  int64_t blocks) {
  if (kind != FloatKind::kBF16) return "nf4_mma_silu_mul_cuda: bf16 x only";
  Nf4MmaTarget targets[2] = {gate, up};
  targets[0].y = out;
  targets[1].y = nullptr;
  return Run(blocks, x, kind, rows, targets, 2, true, in_features, stream, overlapped);
}

const char* nf4_mma_cuda_blocks(int64_t blocks, const void* x, FloatKind kind, int64_t rows,
                                const uint8_t* packed, const Nf4Absmax& absmax,
                                int64_t out_features, int64_t in_features, void* y, void* stream) {
  if (blocks <= 0) return "nf4_mma_cuda_blocks: blocks must be at least 1";
  const Nf4MmaTarget target = Single(packed, absmax, out_features, y);
  return Run(blocks, x, kind, rows, &target, 1, false, in_features, stream, false);
}

}  // namespace lorad::kernels
