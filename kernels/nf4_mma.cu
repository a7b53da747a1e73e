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
//   - each warp streams its part of 16 rows in stages of four 64-blocks through a ring of three
//     shared-memory slots filled by cp.async (two stages in flight while one is decoded, no
//     registers held for them); the grid is persistent (one 16-warp block per SM) so the table is
//     built once per block, and the reduction axis is split over `parts` warps of the block.
//
// Measured (bench/results/2026-12-02-h200-nf4_mma.txt, H200): batch 1 at 26-48% of the copy
// bandwidth on the large shapes (35-58% with programmatic launch), batch 32 in 2.3-2.8x batch
// 1's time and 3.5x faster than dequantize + cuBLAS per decoder layer. Under ncu (down_proj,
// batch 1) it is latency-bound, not bandwidth- or issue-bound: 4 warps per scheduler (the 64 KB
// table and the 126 KB ring leave room for one 16-warp block per SM; 128 registers), one
// instruction issued every ~9 cycles per warp, DRAM 30% busy. Next: more independent work per
// warp (two row tiles per warp sharing x), a smaller table (fewer copies, accept some bank
// conflicts) to fit a second block, and q/k/v and gate/up in one launch each.
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

#include "kernels/device_float.cuh"
#include "kernels/nf4_mma.h"
#include "kernels/programmatic_launch.cuh"

namespace lorad::kernels {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kStageBlocks = 4;  // 64-blocks per row per pipeline stage
constexpr int kStages = 3;       // ring slots per warp: two stages in flight while one is decoded
constexpr int kTileRows = 16;
// Pair table: entry e (a packed byte) of lane l at byte e * 256 + 4 * l; the last entry's
// unused half is not allocated.
constexpr int kPairTableBytes = 255 * 256 + 128;
// A warp's ring slot: 16 rows of kStageBlocks * 32 packed bytes, each row padded to 160 bytes so
// the lanes' 8-byte reads (row g, byte 32u + 8t) fall in distinct banks; then the rows' 8-bit
// absmax codes (4 bytes a row) and absmax2 values (one float a row).
constexpr int kRowStride = kStageBlocks * 32 + 32;
constexpr int kSlotWeights = kTileRows * kRowStride;
constexpr int kSlotBytes = kSlotWeights + kTileRows * 4 + kTileRows * 4;
constexpr int kRingBytes = kWarps * kStages * kSlotBytes;
static_assert(kPairTableBytes % 16 == 0 && kSlotBytes % 16 == 0, "16-byte aligned regions");

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

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Asynchronous global -> shared copies (sm_80+): 16 bytes through L2 only, 4 bytes through L1.
__device__ __forceinline__ void CopyAsync16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(dst), "l"(src)
               : "memory");
}
__device__ __forceinline__ void CopyAsync4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void CommitCopies() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void WaitCopies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// What a lane copies for its warp's tile: 16-byte pieces (lane + 32 i) / 8 = rows lane / 8 + 4i,
// piece lane % 8 of each row's stage bytes; lanes 0-15 also the 8-bit absmax codes of row `lane`,
// lanes 16-31 the absmax2 value of row `lane - 16`.
struct TileCopy {
  const uint8_t* rows[4];  // packed row lane / 8 + 4i (clamped), at piece lane % 8
  const uint8_t* qabsmax;  // lanes 0-15: the row's first 8-bit code
  int64_t first_block;     // lanes 16-31: the row's first block (for absmax2)
};

__device__ __forceinline__ void CopyStage(const TileCopy& tc, int lane, int64_t kb,
                                          const float* __restrict__ absmax2, uint32_t slot) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    CopyAsync16(slot + (lane / 8 + 4 * i) * kRowStride + (lane % 8) * 16, tc.rows[i] + kb * 32);
  }
  if (lane < 16) {
    CopyAsync4(slot + kSlotWeights + lane * 4, tc.qabsmax + kb);  // 4 codes, 4-byte aligned
  } else {
    // 4 aligned blocks never straddle a group of 256: one absmax2 for the stage.
    CopyAsync4(slot + kSlotWeights + kTileRows * 4 + (lane - 16) * 4,
               absmax2 + ((tc.first_block + kb) >> 8));
  }
}

// The T pair of packed byte `i` of `word`, from the lane's column of the pair table.
__device__ __forceinline__ uint32_t PairOf(const unsigned char* table, uint32_t word, int i,
                                           uint32_t lane_offset) {
  // Result bytes: [0] = lane_offset (4 * lane), [1] = byte i of word, [2], [3] = 0.
  const uint32_t offset = __byte_perm(word, lane_offset, 0x5504u | (static_cast<uint32_t>(i) << 4));
  return *reinterpret_cast<const uint32_t*>(table + offset);
}

// Decodes one ring slot (kStageBlocks blocks of the warp's 16 rows) into acc.
template <typename T, int NT>
__device__ __forceinline__ void ComputeStage(const unsigned char* slot, const unsigned char* table,
                                             const float* code2, float offset, uint32_t lane_offset,
                                             const T* __restrict__ x, int64_t x_rows,
                                             int64_t in_features, int64_t kb, int g, int t,
                                             float acc[NT][4]) {
  const uint32_t qa0 = *reinterpret_cast<const uint32_t*>(slot + kSlotWeights + g * 4);
  const uint32_t qa1 = *reinterpret_cast<const uint32_t*>(slot + kSlotWeights + (g + 8) * 4);
  const float* a2 = reinterpret_cast<const float*>(slot + kSlotWeights + kTileRows * 4);
  const float a20 = a2[g], a21 = a2[g + 8];
  // x^T fragments: column n = 8 * nt + g, weights 16t..16t+15 of block kb + u. With one tile all
  // of the stage's are loaded up front (one round trip per stage, not per block, should x miss
  // the little L1 the ring leaves; measured neutral on the H200); four tiles would need 128
  // registers for that.
  constexpr int kXBlocks = NT == 1 ? kStageBlocks : 1;
  uint32_t xs[kXBlocks][NT][8];
  auto load_x = [&](int u, uint32_t(&xb)[NT][8]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int64_t n = 8 * nt + g;
      if (n < x_rows) {
        const uint4* p =
            reinterpret_cast<const uint4*>(x + n * in_features + (kb + u) * 64 + 16 * t);
        const uint4 lo = __ldg(p), hi = __ldg(p + 1);
        xb[nt][0] = lo.x, xb[nt][1] = lo.y, xb[nt][2] = lo.z, xb[nt][3] = lo.w;
        xb[nt][4] = hi.x, xb[nt][5] = hi.y, xb[nt][6] = hi.z, xb[nt][7] = hi.w;
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) xb[nt][i] = 0u;
      }
    }
  };
  if constexpr (NT == 1) {
#pragma unroll
    for (int u = 0; u < kStageBlocks; ++u) load_x(u, xs[u]);
  }
#pragma unroll
  for (int u = 0; u < kStageBlocks; ++u) {
    if constexpr (NT != 1) load_x(u, xs[0]);
    uint32_t(&xb)[NT][8] = xs[NT == 1 ? u : 0];
    const uint2 w0 = *reinterpret_cast<const uint2*>(slot + g * kRowStride + u * 32 + t * 8);
    const uint2 w1 = *reinterpret_cast<const uint2*>(slot + (g + 8) * kRowStride + u * 32 + t * 8);
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
    // The block's absmax exactly as the CPU reference rebuilds it (no fused multiply-add).
    const float scale0 = __fadd_rn(__fmul_rn(code2[(qa0 >> (8 * u)) & 0xffu], a20), offset);
    const float scale1 = __fadd_rn(__fmul_rn(code2[(qa1 >> (8 * u)) & 0xffu], a21), offset);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      acc[nt][0] = fmaf(c[nt][0], scale0, acc[nt][0]);
      acc[nt][1] = fmaf(c[nt][1], scale0, acc[nt][1]);
      acc[nt][2] = fmaf(c[nt][2], scale1, acc[nt][2]);
      acc[nt][3] = fmaf(c[nt][3], scale1, acc[nt][3]);
    }
  }
}

// Block b handles block tiles b, b + gridDim.x, ...; a block tile is kWarps / parts row tiles of
// 16 rows, each reduced by `parts` warps over consecutive ranges of the 64-blocks.
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, 1)
    nf4_mma_kernel(const T* __restrict__ x, int64_t x_rows, const uint8_t* __restrict__ packed,
                   const uint8_t* __restrict__ qabsmax, const float* __restrict__ absmax2,
                   const float* __restrict__ code2_global, float offset, int64_t out_features,
                   int64_t in_features, int parts, T* __restrict__ y) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* table = smem;
  float* code2 = reinterpret_cast<float*>(smem + kPairTableBytes);
  unsigned char* ring = smem + kPairTableBytes + 256 * sizeof(float);
  constexpr int kCols = 8 * NT;
  static_assert(kTileRows * kCols * sizeof(float) <= kSlotBytes, "partials fit a warp's slot");

  AllowDependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const uint32_t lane_offset = 4u * lane;
  const int groups = kWarps / parts;
  const int part = warp % parts, group = warp / parts;
  const int64_t blocks_per_row = in_features / 64;
  const int64_t kb_begin = blocks_per_row / parts * part;
  const int64_t kb_end = kb_begin + blocks_per_row / parts;
  const int64_t row_tiles = (out_features + kTileRows - 1) / kTileRows;
  const int64_t block_tiles = (row_tiles + groups - 1) / groups;
  unsigned char* my_ring = ring + warp * kStages * kSlotBytes;
  const uint32_t my_ring_address = SharedAddress(my_ring);

  bool first = true;
#pragma unroll 1
  for (int64_t bt = blockIdx.x; bt < block_tiles; bt += gridDim.x) {
    const int64_t row0 = (bt * groups + group) * kTileRows;
    TileCopy tc;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // a missing row re-reads the last one and is never stored
      const int64_t r = min(row0 + lane / 8 + 4 * i, out_features - 1);
      tc.rows[i] = packed + r * (in_features / 2) + (lane % 8) * 16;
    }
    const int64_t scale_row = min(row0 + lane % 16, out_features - 1);
    tc.qabsmax = qabsmax + scale_row * blocks_per_row;
    tc.first_block = scale_row * blocks_per_row;
    // Prologue: the first kStages - 1 stages in flight (empty groups keep the count uniform).
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      const int64_t kb = kb_begin + s * kStageBlocks;
      if (kb < kb_end) CopyStage(tc, lane, kb, absmax2, my_ring_address + s * kSlotBytes);
      CommitCopies();
    }
    if (first) {
      // The table and code2 are constant inputs: built while the first copies are in flight
      // and before the predecessor (which may write x) has finished.
      for (int e = warp; e < 256; e += kWarps) {
        *reinterpret_cast<uint32_t*>(table + e * 256 + lane_offset) =
            Pair<T>(kCodeDevice[e >> 4], kCodeDevice[e & 15]);
      }
      for (int i = threadIdx.x; i < 256; i += kThreads) code2[i] = code2_global[i];
      WaitForPredecessor();
      __syncthreads();
      first = false;
    }
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    int slot = 0;
#pragma unroll 1
    for (int64_t kb = kb_begin; kb < kb_end; kb += kStageBlocks) {
      WaitCopies<kStages - 2>();  // this stage's copies (this lane's) have landed
      __syncwarp();               // ... and every lane's
      // Refill the slot decoded in the previous iteration with the stage kStages - 1 ahead.
      const int64_t ahead = kb + (kStages - 1) * kStageBlocks;
      const int refill = slot == 0 ? kStages - 1 : slot - 1;
      if (ahead < kb_end)
        CopyStage(tc, lane, ahead, absmax2, my_ring_address + refill * kSlotBytes);
      CommitCopies();
      ComputeStage<T, NT>(my_ring + slot * kSlotBytes, table, code2, offset, lane_offset, x, x_rows,
                          in_features, kb, g, t, acc);
      __syncwarp();  // every lane is done with the slot before it is refilled
      slot = slot == kStages - 1 ? 0 : slot + 1;
    }
    WaitCopies<0>();  // nothing in flight into the ring before it holds partial sums

    if (parts == 1) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t row = row0 + g + (i >= 2 ? 8 : 0);
          const int64_t col = 8 * nt + 2 * t + (i & 1);
          if (row < out_features && col < x_rows) {
            StoreAs(&y[col * out_features + row], acc[nt][i]);
          }
        }
      }
      __syncwarp();
      continue;
    }
    // Partial sums in the warp's own first slot: [kTileRows][kCols].
    float* mine = reinterpret_cast<float*>(my_ring);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        mine[(g + (i >= 2 ? 8 : 0)) * kCols + 8 * nt + 2 * t + (i & 1)] = acc[nt][i];
      }
    }
    __syncthreads();
    // One thread per (row tile, row, column) sums the parts in order.
    const int cols = static_cast<int>(x_rows < kCols ? x_rows : kCols);
    for (int idx = threadIdx.x; idx < groups * kTileRows * cols; idx += kThreads) {
      const int gi = idx / (kTileRows * cols), r = idx / cols % kTileRows, col = idx % cols;
      const int64_t row = (bt * groups + gi) * kTileRows + r;
      if (row >= out_features) continue;
      float v = 0.f;
      for (int p = 0; p < parts; ++p) {
        const float* theirs =
            reinterpret_cast<const float*>(ring + (gi * parts + p) * kStages * kSlotBytes);
        v += theirs[r * kCols + col];
      }
      StoreAs(&y[col * out_features + row], v);
    }
    __syncthreads();  // the ring is refilled by the next tile
  }
}

constexpr size_t SharedBytes() { return kPairTableBytes + 256 * sizeof(float) + kRingBytes; }

// Per kernel instantiation: the shared-memory opt-in (once) and how many blocks fit on an SM.
template <typename T, int NT>
int ResidentBlocksPerSm() {
  static std::once_flag once;
  static int blocks = 0;
  std::call_once(once, [] {
    const auto kernel = nf4_mma_kernel<T, NT>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(SharedBytes())) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, SharedBytes()) !=
            cudaSuccess) {
      cudaGetLastError();
      blocks = 0;
    }
  });
  return blocks;
}

// The parts of the reduction axis: the candidate (1, 2, 4, 8 dividing the stages of a row) whose
// rounds of resident blocks times stages per warp (plus two for the pipeline's start and the
// reduction) is least; ties go to more parts (shorter tail).
int PlanParts(int64_t out_features, int64_t in_features, int64_t resident_blocks) {
  const int64_t stages = in_features / 64 / kStageBlocks;
  const int64_t row_tiles = (out_features + kTileRows - 1) / kTileRows;
  int best = 1;
  int64_t best_cost = -1;
  for (int parts = 1; parts <= kWarps; parts *= 2) {
    if (stages % parts != 0) continue;
    const int64_t block_tiles = (row_tiles + kWarps / parts - 1) / (kWarps / parts);
    const int64_t rounds = (block_tiles + resident_blocks - 1) / resident_blocks;
    const int64_t cost = rounds * (stages / parts + 2);
    if (best_cost < 0 || cost <= best_cost) {
      best = parts;
      best_cost = cost;
    }
  }
  return best;
}

template <typename T, int NT>
const char* LaunchTyped(int parts, const void* x, int64_t rows, const uint8_t* packed,
                        const Nf4Absmax& absmax, int64_t out_features, int64_t in_features, void* y,
                        cudaStream_t stream, bool overlapped) {
  const int per_sm = ResidentBlocksPerSm<T, NT>();
  if (per_sm <= 0) return "nf4_mma_cuda: the kernel does not fit on this device";
  const int64_t resident = static_cast<int64_t>(per_sm) * SmCount();
  if (parts == 0) parts = PlanParts(out_features, in_features, resident);
  if ((in_features / 64 / kStageBlocks) % parts != 0) {
    return "nf4_mma_cuda: in_features / 256 must be a multiple of parts";
  }
  const int64_t row_tiles = (out_features + kTileRows - 1) / kTileRows;
  const int64_t block_tiles = (row_tiles + kWarps / parts - 1) / (kWarps / parts);
  const dim3 grid(static_cast<unsigned>(std::min(block_tiles, resident)));
  const cudaError_t err = LaunchMaybeOverlapped(
      nf4_mma_kernel<T, NT>, grid, dim3(kThreads), SharedBytes(), stream, overlapped,
      static_cast<const T*>(x), rows, packed, absmax.qabsmax, absmax.absmax2, absmax.code2,
      absmax.offset, out_features, in_features, parts, static_cast<T*>(y));
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* LaunchTiles(int parts, const void* x, int64_t rows, const uint8_t* packed,
                        const Nf4Absmax& absmax, int64_t out_features, int64_t in_features, void* y,
                        cudaStream_t stream, bool overlapped) {
  if (rows <= 8) {
    return LaunchTyped<T, 1>(parts, x, rows, packed, absmax, out_features, in_features, y, stream,
                             overlapped);
  }
  if (rows <= 16) {
    return LaunchTyped<T, 2>(parts, x, rows, packed, absmax, out_features, in_features, y, stream,
                             overlapped);
  }
  return LaunchTyped<T, 4>(parts, x, rows, packed, absmax, out_features, in_features, y, stream,
                           overlapped);
}

const char* Run(int parts, const void* x, FloatKind kind, int64_t rows, const uint8_t* packed,
                const Nf4Absmax& absmax, int64_t out_features, int64_t in_features, void* y,
                void* stream, bool overlapped) {
  if (!nf4_mma_cuda_supports(rows, in_features, kind)) {
    return "nf4_mma_cuda: unsupported problem (needs bf16 or fp16 x, 1..32 rows and "
           "in_features % 256 == 0)";
  }
  if (parts < 0 || parts > kWarps || (parts & (parts - 1)) != 0) {
    return "nf4_mma_cuda: parts must be 1, 2, 4, 8 or 16";
  }
  if (out_features <= 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  if (kind == FloatKind::kBF16) {
    return LaunchTiles<__nv_bfloat16>(parts, x, rows, packed, absmax, out_features, in_features, y,
                                      s, overlapped);
  }
  return LaunchTiles<__half>(parts, x, rows, packed, absmax, out_features, in_features, y, s,
                             overlapped);
}

}  // namespace

bool nf4_mma_cuda_supports(int64_t rows, int64_t in_features, FloatKind kind) {
  return (kind == FloatKind::kBF16 || kind == FloatKind::kF16) && rows >= 1 &&
         rows <= kNf4MmaMaxRows && in_features > 0 && in_features % (64 * kStageBlocks) == 0;
}

const char* nf4_mma_cuda(const void* x, FloatKind kind, int64_t rows, const uint8_t* packed,
                         const Nf4Absmax& absmax, int64_t out_features, int64_t in_features,
                         void* y, void* stream, bool overlapped) {
  return Run(0, x, kind, rows, packed, absmax, out_features, in_features, y, stream, overlapped);
}

const char* nf4_mma_cuda_parts(int parts, const void* x, FloatKind kind, int64_t rows,
                               const uint8_t* packed, const Nf4Absmax& absmax, int64_t out_features,
                               int64_t in_features, void* y, void* stream) {
  if (parts == 0) return "nf4_mma_cuda: parts must be 1, 2, 4, 8 or 16";
  return Run(parts, x, kind, rows, packed, absmax, out_features, in_features, y, stream, false);
}

}  // namespace lorad::kernels
