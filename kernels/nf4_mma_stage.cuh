// One warp's pipeline stage of nf4_mma.cu: the warp tile's shape (WarpTile), the cp.async copy of
// a stage of packed weights and absmax codes into a ring slot (TileCopy, CopyStage), and its
// decode on the tensor cores (ComputeStage). Included by nf4_mma.cu only; raw pointers, no torch.
//
// Fragment layout (PTX ISA, mma.m16n8k16 with .bf16/.f16): lane = 4 * g + t. A (16 x 16, weights):
// a0a1 = (row g, k 2t..2t+1), a2a3 = (row g+8, same k), a4a5 = (row g, k 2t+8..2t+9),
// a6a7 = (row g+8, k 2t+8..). B (16 x 8, x^T): b0b1 = (k 2t..2t+1, col g), b2b3 = (k 2t+8..,
// col g). C: c0c1 = (row g, cols 2t, 2t+1), c2c3 = (row g+8, same cols).
// The k slots of one mma need not be consecutive weights, only the same ones for A and B: lane t
// owns bytes 8t..8t+7 (weights 16t..16t+15) of every 64-block, and step s (0..3) of a block gives
// slots 2t, 2t+1 its byte 2s (weights 16t + 4s, +1) and slots 2t+8, 2t+9 its byte 2s+1
// (16t + 4s + 2, +3). All 16 k of a step lie in one 64-block, so one absmax scales them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <type_traits>

#include "kernels/async_copy.cuh"
#include "kernels/device_float.cuh"
#include "kernels/nf4.h"

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
  // The blocks' scales of rows g and g + 8 (one tile): decoded by the group's four lanes and
  // shared through the rows' padding.
  float scale_stage[2][4];
  const auto share_scales = [&] {
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
  };
  // Batch 1 (one tile, one x tile) shares them after the stage's tensor-core ops, keeping the
  // four blocks' unscaled products (16 registers) until then: the x loads and the first HMMAs no
  // longer wait behind two dependent shared-memory round trips and a warp barrier. The layer at
  // batch 1: 80.2 -> 79.7 us, with programmatic launch 63.3 -> 62.7 (and no spills: 12 bytes
  // before; 2026-12-03-h200-nf4_mma-scales-late.txt). More x tiles lack the registers.
  constexpr bool kScalesLate = MT == 1 && NT == 1;
  if constexpr (MT == 1 && !kScalesLate) share_scales();
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
  // Scales late: every block's products first, kept unscaled until the scales are shared.
  float late[kScalesLate ? W::kStageBlocks : 1][NT][4];
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
      float(&c)[NT][4] = late[kScalesLate ? u : 0];
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
      if constexpr (!kScalesLate) {
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
  if constexpr (kScalesLate) {
    share_scales();
#pragma unroll
    for (int u = 0; u < W::kStageBlocks; ++u) {
      acc[0][0][0] = fmaf(late[u][0][0], scale_stage[0][u], acc[0][0][0]);
      acc[0][0][1] = fmaf(late[u][0][1], scale_stage[0][u], acc[0][0][1]);
      acc[0][0][2] = fmaf(late[u][0][2], scale_stage[1][u], acc[0][0][2]);
      acc[0][0][3] = fmaf(late[u][0][3], scale_stage[1][u], acc[0][0][3]);
    }
  }
}

}  // namespace
}  // namespace lorad::kernels
