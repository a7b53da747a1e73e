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
// short-scoreboard and MIO waits, DRAM about half busy), and more bytes in flight did not help.
//
// Fragment layout (PTX ISA, mma.m16n8k16 with .bf16/.f16): lane = 4 * g + t. A (16 x 16, weights):
// a0a1 = (row g, k 2t..2t+1), a2a3 = (row g+8, same k), a4a5 = (row g, k 2t+8..2t+9),
// a6a7 = (row g+8, k 2t+8..). B (16 x 8, x^T): b0b1 = (k 2t..2t+1, col g), b2b3 = (k 2t+8..,
// col g). C: c0c1 = (row g, cols 2t, 2t+1), c2c3 = (row g+8, same cols).
// The k slots of one mma need not be consecutive weights, only the same ones for A and B: lane t
// owns bytes 8t..8t+7 (weights 16t..16t+15) of every 64-block, and step s (0..3) of a block gives
// slots 2t, 2t+1 its byte 2s (weights 16t + 4s, +1) and slots 2t+8, 2t+9 its byte 2s+1
// (16t + 4s + 2, +3). All 16 k of a step lie in one 64-block, so one absmax scales them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "kernels/async_copy.cuh"
#include "kernels/device_float.cuh"
#include "kernels/nf4_mma.h"
#include "kernels/programmatic_launch.cuh"

namespace lorad::kernels {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
// Pair table: entry e (a packed byte) of lane l at byte e * 256 + 4 * l; the last entry's
// unused half is not allocated.
constexpr int kPairTableBytes = 255 * 256 + 128;

// A warp's tile: MT 16-row tensor-core tiles of W. One tile (MT = 1) for up to 8 rows of x; two
// (MT = 2) for 9..32 rows, so that each x fragment, loaded from L1 into registers, serves 32
// rows of W instead of 16: at 32 rows of x the x loads, not the weights, were what kept the
// L1 busiest (ncu, gate_proj at batch 32: L1 67% busy, DRAM 10%).
template <int MT>
struct WarpTile {
  static constexpr int kRows = 16 * MT;
  // 64-blocks per row per pipeline stage: a stage is 2 KB of packed weights either way.
  static constexpr int kStageBlocks = 4 / MT;
  static constexpr int kPiecesPerRow = kStageBlocks * 2;   // 16-byte cp.async pieces
  static constexpr int kRowsPerCopy = 32 / kPiecesPerRow;  // rows one warp-wide copy covers
  // Bytes from one row to the next in a ring slot. MT = 1 pads each row to 160 bytes so the
  // lanes' 8-byte reads (row g, byte 32u + 8t) fall in distinct banks; MT = 2 packs rows at 64
  // bytes and swaps the two 32-byte blocks of rows with bit 1 set (BlockOffset) for the same.
  static constexpr int kRowStride = MT == 1 ? kStageBlocks * 32 + 32 : kStageBlocks * 32;
  static constexpr int kSlotWeights = kRows * kRowStride;
  // Then each row's 8-bit absmax codes (one aligned 4-byte word: 4 blocks) and absmax2 value.
  static constexpr int kSlotBytes = kSlotWeights + kRows * 4 + kRows * 4;
  // Ring slots per warp: kStages - 1 stages in flight while one is decoded. One tile (batch 1)
  // takes 2, which ran 2-5% faster than 3 (the layer 80.2 -> 78.2 us, PDL 64.0 -> 62.4;
  // 2026-12-03-h200-nf4_mma-more-warps.txt), probably as the smaller ring (shared memory about
  // 160 KB instead of 198) leaves L1 more room for the x loads.
  static constexpr int kStages = MT == 1 ? 2 : 3;
  static constexpr int kRingBytes = kWarps * kStages * kSlotBytes;
  static_assert(kSlotBytes % 16 == 0 && kRowStride % 16 == 0, "16-byte aligned regions");

  // Where block u of tile row r starts within the row. Rows r and r + kRowsPerCopy agree on
  // bit 1 (kRowsPerCopy is 4 or 8), so one lane's pieces all land at the same offset in a row.
  __device__ static __forceinline__ int BlockOffset(int r, int u) {
    return MT == 1 ? u * 32 : (u ^ ((r >> 1) & 1)) * 32;
  }
};
static_assert(kPairTableBytes % 16 == 0, "16-byte aligned regions");

__constant__ float kCodeDevice[16] = {kNf4Code[0],  kNf4Code[1],  kNf4Code[2],  kNf4Code[3],
                                      kNf4Code[4],  kNf4Code[5],  kNf4Code[6],  kNf4Code[7],
                                      kNf4Code[8],  kNf4Code[9],  kNf4Code[10], kNf4Code[11],
                                      kNf4Code[12], kNf4Code[13], kNf4Code[14], kNf4Code[15]};

// Bits of (lo, hi) rounded to T, lo in the low half (the smaller k).
template <typename T>
__device__ __forceinline__ uint32_t Pair(float lo, float hi) {
  T p[2];
  StoreAs(&p[0], lo);
  StoreAs(&p[1], hi);
  uint32_t bits;
  memcpy(&bits, p, sizeof bits);
  return bits;
}

// c += A B for one m16n8k16 tile, T = bf16 or fp16, fp32 accumulation.
#define LORAD_NF4_MMA(TYPE)                                  \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE \
      ".f32 {%0, %1, %2, %3}, "                              \
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"        \
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])       \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
__device__ __forceinline__ void Mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    LORAD_NF4_MMA("bf16");
  } else {
    LORAD_NF4_MMA("f16");
  }
}
#undef LORAD_NF4_MMA

// Where a lane's 16-byte piece i (< 4) of a stage of W lies: row `row` + kRowsPerCopy i (rows
// past the last one clamped to it: a missing row re-reads the last and is never stored), piece
// `piece` of the row's stage. Two ways, each the faster where it is used. One tile (batch 1):
// the bytes from the first row to the other three, so a stage's addresses are one add each,
// not a row multiply (part of the loop's 319 -> 263 instructions).
template <int kRowsPerCopy>
struct PieceByRowOffset {
  const uint8_t* packed;   // W's packed bytes at the piece of the lane's first row
  uint32_t row_offset[3];  // bytes from that row to rows + kRowsPerCopy i, i = 1..3

  __device__ __forceinline__ void Init(int64_t /*row_bytes: given to each Point*/) {}
  __device__ __forceinline__ void Point(const uint8_t* weight, int64_t row, int64_t last_row,
                                        int64_t row_bytes, int piece) {
    row = min(row, last_row);
    packed = weight + row * row_bytes + piece * 16;
#pragma unroll
    for (int i = 1; i < 4; ++i) {
      const int64_t row_i = min(row + i * kRowsPerCopy, last_row);
      row_offset[i - 1] = static_cast<uint32_t>((row_i - row) * row_bytes);
    }
  }
  __device__ __forceinline__ const uint8_t* At(uint32_t kb, int i) const {
    const uint8_t* stage = packed + kb * 32u;
    return i == 0 ? stage : stage + row_offset[i - 1];
  }
};

// Two tiles (batch 9-32): the row multiplied out per piece. The offsets (with x addressed once a
// stage, see ComputeStage) took that kernel's spills from 108 to 220 bytes and the engine's
// batch-32 decode 5% slower (2026-12-03-h200-generation-8b-ab-lean-loop.txt).
template <int kRowsPerCopy>
struct PieceByRowMultiply {
  const uint8_t* packed;  // W's packed bytes at the lane's piece
  uint32_t row_bytes;     // in_features / 2
  uint32_t row;           // the lane's first row
  uint32_t last_row;      // out_features - 1

  // Row bytes once per kernel: set in each Point, they spilled more (144 bytes, not 108).
  __device__ __forceinline__ void Init(int64_t bytes) { row_bytes = static_cast<uint32_t>(bytes); }
  __device__ __forceinline__ void Point(const uint8_t* weight, int64_t first_row, int64_t last,
                                        int64_t /*row_bytes: Init's*/, int piece) {
    packed = weight + piece * 16;
    row = static_cast<uint32_t>(first_row);
    last_row = static_cast<uint32_t>(last);
  }
  __device__ __forceinline__ const uint8_t* At(uint32_t kb, int i) const {
    const uint32_t r = min(row + i * kRowsPerCopy, last_row);
    return packed + static_cast<uint64_t>(r) * row_bytes + kb * 32u;
  }
};

// What a lane copies for its warp's tile: 16-byte pieces p = lane + 32 i (i < 4: a stage is
// 2 KB), which are piece lane % kPiecesPerRow of rows lane / kPiecesPerRow + kRowsPerCopy i.
// Absmax: with MT = 1, lanes 0-15 copy the 8-bit codes of row `lane`, lanes 16-31 the absmax2
// value of row `lane - 16`; with MT = 2 every lane copies both for row `lane`. Pointers are kept
// to one per kind (and the piece offsets recomputed) to spare registers; rows, row bytes and
// block numbers are 32-bit (the launcher checks), which spares more.
template <int MT>
struct TileCopy {
  static constexpr int kRowsPerCopy = WarpTile<MT>::kRowsPerCopy;
  std::conditional_t<MT == 1, PieceByRowOffset<kRowsPerCopy>, PieceByRowMultiply<kRowsPerCopy>>
      pieces;
  uint32_t dst;            // where the lane's first piece goes in a ring slot
  const uint8_t* qabsmax;  // the row's first 8-bit code
  uint32_t first_block;    // the row's first block (for absmax2)
};

template <int MT>
__device__ __forceinline__ void CopyStage(const TileCopy<MT>& tc, int lane, uint32_t kb,
                                          const float* __restrict__ absmax2, uint32_t slot) {
  using W = WarpTile<MT>;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    CopyAsync16(slot + tc.dst + i * W::kRowsPerCopy * W::kRowStride, tc.pieces.At(kb, i));
  }
  // The aligned word of 4 codes holding this stage's; a stage's aligned blocks never straddle
  // a group of 256, so one absmax2 value serves the stage.
  const uint32_t codes = slot + W::kSlotWeights + (lane % W::kRows) * 4;
  const uint32_t scale2 = slot + W::kSlotWeights + W::kRows * 4 + (lane % W::kRows) * 4;
  if (MT != 1 || lane < 16) CopyAsync4(codes, tc.qabsmax + (kb & ~3u));
  if (MT != 1 || lane >= 16) CopyAsync4(scale2, absmax2 + ((tc.first_block + kb) >> 8));
}

// The T pair of packed byte `i` of `word`, from the lane's column of the pair table.
__device__ __forceinline__ uint32_t PairOf(const unsigned char* table, uint32_t word, int i,
                                           uint32_t lane_offset) {
  // Result bytes: [0] = lane_offset (4 * lane), [1] = byte i of word, [2], [3] = 0.
  const uint32_t offset = __byte_perm(word, lane_offset, 0x5504u | (static_cast<uint32_t>(i) << 4));
  return *reinterpret_cast<const uint32_t*>(table + offset);
}

// The code2 level of byte shift / 8 of a word of 8-bit absmax codes, from the weight's 256 levels
// at shared address code2: a PRMT and a LEA (shift and mask, then index arithmetic from the
// weight number, took four).
__device__ __forceinline__ float Code2At(uint32_t code2, uint32_t word, int shift) {
  const uint32_t code = __byte_perm(word, 0u, 0x4440u | static_cast<uint32_t>(shift >> 3));
  float level;
  // Not volatile: the levels do not change while the kernel runs, so it may be scheduled freely.
  asm("ld.shared.f32 %0, [%1];" : "=f"(level) : "r"(code2 + 4 * code));
  return level;
}

// Decodes one ring slot (kStageBlocks blocks of the warp's MT * 16 rows) into acc.
template <typename T, int NT, int MT>
__device__ __forceinline__ void ComputeStage(unsigned char* slot, const unsigned char* table,
                                             const float* code2, float offset, uint32_t lane_offset,
                                             const T* const (&xrow)[NT], uint32_t kb, int g, int t,
                                             float acc[MT][NT][4]) {
  using W = WarpTile<MT>;
  const float* a2s = reinterpret_cast<const float*>(slot + W::kSlotWeights + W::kRows * 4);
  // The blocks' absmax exactly as the CPU reference rebuilds it (no fused multiply-add) from the
  // rows' code words and absmax2 values. With one tile, lane t decodes block t's of rows g and
  // g + 8 for its group's four lanes and leaves them in the rows' padding, where each lane reads
  // its rows' four at once: two decodes a lane instead of eight. With two tiles (no padding), each
  // lane decodes its own where they are used (registers are short there).
  const auto decode = [&](int r, int u) {
    const uint32_t codes = *reinterpret_cast<const uint32_t*>(slot + W::kSlotWeights + r * 4);
    const int shift = 8 * (MT == 1 ? u : static_cast<int>(kb & 3) + u);
    // (Two tiles: the plain indexing, which spilled less there.)
    const float level =
        MT == 1 ? Code2At(SharedAddress(code2), codes, shift) : code2[(codes >> shift) & 0xffu];
    return __fadd_rn(__fmul_rn(level, a2s[r]), offset);
  };
  float scale_stage[2][4];
  if constexpr (MT == 1) {
    unsigned char* padding = slot + W::kStageBlocks * 32;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      *reinterpret_cast<float*>(padding + (g + 8 * h) * W::kRowStride + 4 * t) =
          decode(g + 8 * h, t);
    }
    __syncwarp();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float4 s = *reinterpret_cast<const float4*>(padding + (g + 8 * h) * W::kRowStride);
      scale_stage[h][0] = s.x, scale_stage[h][1] = s.y, scale_stage[h][2] = s.z;
      scale_stage[h][3] = s.w;
    }
  }
  // x^T fragments: column n = 8 * nt + g, weights 16t..16t+15 of block kb + u. With one tile all
  // of the stage's are loaded up front (one round trip per stage, not per block, should x miss
  // the little L1 the ring leaves; measured neutral on the H200); four tiles would need 128
  // registers for that.
  constexpr int kXBlocks = NT == 1 ? W::kStageBlocks : 1;
  uint32_t xs[kXBlocks][NT][8];
  // Lane t's 16 x values (32 bytes) of block kb + u of each of its x rows, as 8 T pairs (xrow:
  // the kernel's row pointers, so only the stage's offset is added here).
  // With one x tile, the stage's x address once: its blocks are then constant offsets (kb + u
  // in 32 bits would make the compiler redo the 64-bit address for every block). With more, the
  // extra live pointers spilled (batch 32: 108 -> 220 spilled bytes, 5% slower), so per block.
  const T* xk[NT];
  if constexpr (NT == 1) xk[0] = xrow[0] + kb * 64u;
  auto load_x = [&](int u, uint32_t(&xb)[NT][8]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const T* at = NT == 1 ? xk[0] + u * 64 : xrow[nt] + (kb + u) * 64;
      const uint4* p = reinterpret_cast<const uint4*>(at);
      const uint4 lo = __ldg(p), hi = __ldg(p + 1);
      xb[nt][0] = lo.x, xb[nt][1] = lo.y, xb[nt][2] = lo.z, xb[nt][3] = lo.w;
      xb[nt][4] = hi.x, xb[nt][5] = hi.y, xb[nt][6] = hi.z, xb[nt][7] = hi.w;
    }
  };
  if constexpr (NT == 1) {
#pragma unroll
    for (int u = 0; u < W::kStageBlocks; ++u) load_x(u, xs[u]);
  }
#pragma unroll
  for (int u = 0; u < W::kStageBlocks; ++u) {
    if constexpr (NT != 1) load_x(u, xs[0]);
    uint32_t(&xb)[NT][8] = xs[NT == 1 ? u : 0];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int r0 = g + 16 * m, r1 = r0 + 8;
      const uint2 w0 = *reinterpret_cast<const uint2*>(slot + r0 * W::kRowStride +
                                                       W::BlockOffset(r0, u) + t * 8);
      const uint2 w1 = *reinterpret_cast<const uint2*>(slot + r1 * W::kRowStride +
                                                       W::BlockOffset(r1, u) + t * 8);
      float c[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
      for (int step = 0; step < 4; ++step) {
        const uint32_t word0 = step < 2 ? w0.x : w0.y;
        const uint32_t word1 = step < 2 ? w1.x : w1.y;
        const int i = 2 * (step & 1);
        uint32_t a[4];
        a[0] = PairOf(table, word0, i, lane_offset);
        a[1] = PairOf(table, word1, i, lane_offset);
        a[2] = PairOf(table, word0, i + 1, lane_offset);
        a[3] = PairOf(table, word1, i + 1, lane_offset);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          Mma<T>(c[nt], a, xb[nt][2 * step], xb[nt][2 * step + 1]);
        }
      }
      const float scale0 = MT == 1 ? scale_stage[0][u] : decode(r0, u);
      const float scale1 = MT == 1 ? scale_stage[1][u] : decode(r1, u);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        acc[m][nt][0] = fmaf(c[nt][0], scale0, acc[m][nt][0]);
        acc[m][nt][1] = fmaf(c[nt][1], scale0, acc[m][nt][1]);
        acc[m][nt][2] = fmaf(c[nt][2], scale1, acc[m][nt][2]);
        acc[m][nt][3] = fmaf(c[nt][3], scale1, acc[m][nt][3]);
      }
    }
  }
}

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
// contributions in warp order and writes y.
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
  return (tile - (ti == 0 ? 0 : targets.tile_end[ti - 1])) * rows_per_tile;
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
    const Nf4MmaTarget& target = targets.t[ti];
    const int64_t row0 = FirstRowOf(targets, tile, ti, W::kRows);
    kb_begin = static_cast<uint32_t>(u % stages * W::kStageBlocks);
    kb_end = kb_begin + static_cast<uint32_t>(u_end - u) * W::kStageBlocks;
    tc.pieces.Point(target.packed, row0 + first_row, target.out_features - 1, in_features / 2,
                    piece);
    const int64_t scale_row = min(row0 + lane % W::kRows, target.out_features - 1);
    tc.qabsmax = target.absmax.qabsmax + scale_row * blocks_per_row;
    tc.first_block = static_cast<uint32_t>(scale_row * blocks_per_row);
  };
  // The first kStages - 1 stages of the segment in flight (empty groups keep the count uniform).
  const auto prologue = [&] {
    const float* absmax2 = targets.t[ti].absmax.absmax2;
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
    if (segments > 0) {
      begin_segment(t0, u_begin, u_split);
      prologue();
    }
    if (first) {
      // The table and code2 are constant inputs: built while the first copies are in flight
      // and before the predecessor (which may write x) has finished.
      for (int e = warp; e < 256; e += kWarps) {
        *reinterpret_cast<uint32_t*>(table + e * 256 + lane_offset) =
            Pair<T>(kCodeDevice[e >> 4], kCodeDevice[e & 15]);
      }
      for (int i = threadIdx.x; i < 256 * targets.count; i += kThreads) {
        code2s[i] = targets.t[i / 256].absmax.code2[i % 256];
      }
      WaitForPredecessor();
      __syncthreads();
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
    __syncthreads();
    // Tile `local`'s sum at (r, col): the warps' contributions added in warp order. The tile's
    // units are [local S, (local + 1) S); warp w's share is [w U / 16, (w + 1) U / 16), and
    // warps with an empty share wrote nothing.
    const auto tile_sum = [&](int local, int r, int col) {
      const int first_unit = local * stages, end_unit = first_unit + stages;
      float v = 0.f;
      for (int w = first_unit * kWarps / units; w < kWarps; ++w) {
        const int w_begin = w * units / kWarps, w_end = (w + 1) * units / kWarps;
        if (w_begin >= end_unit) break;
        if (w_end <= first_unit || w_begin == w_end) continue;
        const float* part =
            w_end > end_unit
                ? boundary + local * (W::kRows * kCols)
                : reinterpret_cast<const float*>(ring + w * W::kStages * W::kSlotBytes);
        v += part[r * kCols + col];
      }
      return v;
    };
    // One thread per (tile or gate/up pair, row, column) (compile-time divisors: this runs after
    // every range).
    const int cols = static_cast<int>(x_rows < kCols ? x_rows : kCols);
    for (int idx = threadIdx.x; idx < (tiles_here >> group_shift) * W::kRows * kCols;
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
    __syncthreads();  // the rings and boundary buffers are reused by the next range
  }
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
  return (kind == FloatKind::kBF16 || kind == FloatKind::kF16) && rows >= 1 &&
         rows <= kNf4MmaMaxRows && in_features > 0 && in_features % 256 == 0 &&
         // TileCopy's 32-bit row offsets span up to 24 rows of in_features / 2 bytes.
         12 * in_features < (int64_t{1} << 32);
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
