// CUDA implementation of kernels/nf4_gemv.h. Raw pointers only: no torch headers here.
//
// Decode is memory-bound: the packed weights are read once per call and nothing else is large. At
// Llama-3-8B shapes one call moves only 2-30 MB, about 16-220 KB per SM of an H200, so the kernel
// must (a) have nearly all of its bytes in flight at once, (b) decode cheaply enough that the
// arithmetic after the last bytes arrive is short, and (c) spread that arithmetic over every SM.
//
// Version 2 (v1's numbers: bench/results/2026-12-01-h200-nf4_gemv.txt, 25-37% of copy):
//   - a CUDA block of 8 warps; each warp owns kRows output rows and one of P parts of the reduction
//     axis (split-K inside the block, P = 1..8, reduced through shared memory in a fixed order), so
//     small-`out` shapes (k/v: 1024 rows) still give every SM dozens of warps. The launcher picks
//     the rows per warp and P from the shape and the SM count (MakePlan);
//   - lane l reads 16-byte chunks (32 codes, half a 64-block) l, l + 32, ... of its part of each
//     row with ld.global.nc.L1::no_allocate; all kRows x kUnroll loads are issued before the first
//     is used, and the x chunk (through L1) is converted once and reused for the warp's rows;
//   - cheaper decode: two shifts and two ANDs turn a 32-bit word into eight byte offsets into the
//     16-entry code book (a conflict-free shared-memory table), one PRMT extracts each: about 1.5
//     integer instructions per element instead of ~3;
//   - the block's absmax is rebuilt once per 32 codes from the byte qabsmax, code2 in shared
//     memory and absmax2, exactly as the CPU reference does (no fused multiply-add);
//   - programmatic dependent launch (nf4_gemv_cuda_overlapped, sm_90): the kernel lets its
//     successor start early, and loads its first weight chunks before waiting for its predecessor,
//     so a chain of decode kernels overlaps one kernel's weight fetch with the previous one's tail.
//
// Measured (bench/results/2026-12-01-h200-nf4_gemv-v2.txt, H200, batch 1, bf16): about v1's speed
// on the large shapes (24-38% of copy; 4 rows per warp best), k/v 1.3x faster (2 rows per warp:
// 13%), PDL another 1.3-1.8 us per call; the 70% target is not reached. Diagnosis: every warp
// issues all its loads, waits, then decodes, so across the SM the load phase and the decode phase
// do not overlap, and with ~1.3 waves of blocks the pattern runs twice; the decode (~4 issue slots
// per element) alone is about as long as the HBM time. Next: a persistent grid of one wave with
// each warp streaming many chunks, loads of chunk i+1 in flight while decoding chunk i (double
// buffer, or cp.async.bulk into shared memory), and fewer instructions per element (read SASS).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/nf4_gemv.h"
#include "kernels/programmatic_launch.cuh"
#include "kernels/warp_reduce.cuh"

namespace lorad::kernels {
namespace {

constexpr int kWarps = 8;  // warps per CUDA block
constexpr int kThreads = kWarps * 32;

struct Codes {
  float code[16];
};

__device__ __forceinline__ uint4 LoadStreaming(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Eight consecutive x values as fp32. p is 16-byte aligned (in_features % 64 == 0).
__device__ __forceinline__ void Load8(const float* p, float out[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
__device__ __forceinline__ void Load8(const __nv_bfloat16* p, float out[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 is the top half of an fp32: the conversion is a shift
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void Load8(const __half* p, float out[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &words[i], 4);
    const float2 f = __half22float2(h);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void Store(float* p, float v) { *p = v; }
__device__ __forceinline__ void Store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void Store(__half* p, float v) { *p = __float2half_rn(v); }

// The code-book entry at byte offset `off` (4 * index) of the shared 16-float table.
__device__ __forceinline__ float CodeAt(const float* code, uint32_t off) {
  return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(code) + off);
}

// The 8 levels of one 32-bit word of packed weights (4 bytes, high nibble first). Each nibble is
// moved to bits 2..5 of its byte (4 * index) for all four bytes at once, then one PRMT per element
// extracts the byte as the table offset.
__device__ __forceinline__ void Decode8(uint32_t word, const float* code, float out[8]) {
  const uint32_t hi = (word >> 2) & 0x3C3C3C3Cu;
  const uint32_t lo = (word << 2) & 0x3C3C3C3Cu;
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    out[2 * b] = CodeAt(code, __byte_perm(hi, 0u, 0x4440u | b));
    out[2 * b + 1] = CodeAt(code, __byte_perm(lo, 0u, 0x4440u | b));
  }
}

__device__ __forceinline__ uint32_t Word(const uint4& v, int c) {
  return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
}

// Loads in flight per lane and iteration: kRows * Unroll<kRows, M>() chunks.
template <int kRows, int M>
__host__ __device__ constexpr int Unroll() {
  return M <= 2 ? (kRows >= 4 ? 1 : 4 / kRows) : 1;
}

// Block b, warp w: rows [(b * G + w / P) * kRows, +kRows), part w % P of the chunks, G = 8 / P.
// At most 85 registers for one x row (decode), so 3 blocks (24 warps) fit on an SM.
template <typename T, int M, int kRows>
__global__ void __launch_bounds__(kThreads, M == 1 ? 3 : 1)
    nf4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                    const uint8_t* __restrict__ qabsmax, const float* __restrict__ absmax2,
                    const float* __restrict__ code2_global, float offset, Codes codes,
                    int64_t out_features, int64_t in_features, int parts, T* __restrict__ y) {
  constexpr int kUnroll = Unroll<kRows, M>();
  __shared__ float code[16];
  __shared__ float code2[256];
  __shared__ float partial[kWarps][kRows][M];

  AllowDependents();
  // The code books are constant inputs (like the weights): read before the predecessor finishes.
  for (int i = threadIdx.x; i < 256; i += kThreads) code2[i] = code2_global[i];
  if (threadIdx.x == 0) {  // constant indices: a run-time index would copy `codes` to local memory
#pragma unroll
    for (int i = 0; i < 16; ++i) code[i] = codes.code[i];
  }

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int groups = kWarps / parts;
  const int part = warp % parts;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * groups + warp / parts) * kRows;
  const int64_t chunks = in_features / 32;  // 16-byte chunks per row
  const int64_t blocks_per_row = in_features / kNf4BlockSize;
  const int64_t j_begin = chunks * part / parts, j_end = chunks * (part + 1) / parts;

  int64_t row[kRows];  // clamped: a missing row re-reads the last one and is never stored
#pragma unroll
  for (int r = 0; r < kRows; ++r) row[r] = min(row0 + r, out_features - 1);

  float acc[kRows][M];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  }

  // Every thread runs the first iteration (its loads predicated off past its part), so all of
  // them meet the one barrier there.
  bool first = true;
  for (int64_t j0 = j_begin + lane;; j0 += 32 * kUnroll) {
    if (!first && j0 >= j_end) break;
    uint4 w[kRows][kUnroll];
    uint32_t qa[kRows][kUnroll];
    float a2[kRows][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + 32 * u;
      const bool in_part = j < j_end;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t b = row[r] * blocks_per_row + j / 2;
        w[r][u] = in_part
                      ? LoadStreaming(
                            reinterpret_cast<const uint4*>(packed + row[r] * (in_features / 2)) + j)
                      : make_uint4(0, 0, 0, 0);
        qa[r][u] = in_part ? __ldg(qabsmax + b) : 0;
        a2[r][u] = in_part ? __ldg(absmax2 + (b >> 8)) : 0.f;
      }
    }
    if (first) {
      WaitForPredecessor();  // x may be the predecessor's output
      __syncthreads();       // code and code2 are written
      first = false;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + 32 * u;
      if (j >= j_end) break;
      float part_sum[kRows][M];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) part_sum[r][m] = 0.f;
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float xv[M][8];
#pragma unroll
        for (int m = 0; m < M; ++m) Load8(x + m * in_features + j * 32 + c * 8, xv[m]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float wf[8];
          Decode8(Word(w[r][u], c), code, wf);
#pragma unroll
          for (int m = 0; m < M; ++m) {
#pragma unroll
            for (int e = 0; e < 8; ++e) part_sum[r][m] = fmaf(wf[e], xv[m][e], part_sum[r][m]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        // The block's absmax exactly as the CPU reference rebuilds it (no fused multiply-add).
        const float scale = __fadd_rn(__fmul_rn(code2[qa[r][u]], a2[r][u]), offset);
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = fmaf(part_sum[r][m], scale, acc[r][m]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      acc[r][m] = WarpSum(acc[r][m]);
    }
  }
  if (parts == 1) {
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (row0 + r >= out_features) break;
#pragma unroll
        for (int m = 0; m < M; ++m) Store(y + m * out_features + row0 + r, acc[r][m]);
      }
    }
    return;
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int m = 0; m < M; ++m) partial[warp][r][m] = acc[r][m];
    }
  }
  __syncthreads();
  // One thread per (row group, row, x row) sums the parts in order.
  const int t = threadIdx.x;
  if (t < groups * kRows * M) {
    const int g = t / (kRows * M), r = t / M % kRows, m = t % M;
    const int64_t o = (static_cast<int64_t>(blockIdx.x) * groups + g) * kRows + r;
    if (o < out_features) {
      float v = 0.f;
      for (int p = 0; p < parts; ++p) v += partial[g * parts + p][r][m];
      Store(y + m * out_features + o, v);
    }
  }
}

// Rows per warp (when not fixed by the caller) and parts of the reduction axis: enough warps to
// give every SM about kWarpsPerSm of them, parts of at least 32 chunks so every lane has work.
struct Plan {
  int rows_per_warp = 1;
  int parts = 1;
};
Plan MakePlan(int rows_per_warp, int64_t out_features, int64_t in_features) {
  constexpr int64_t kWarpsPerSm = 32;
  const int64_t target = SmCount() * kWarpsPerSm;
  const int64_t chunks = in_features / 32;
  int max_parts = 1;
  while (max_parts * 2 <= kWarps && chunks / (max_parts * 2) >= 32) max_parts *= 2;
  Plan plan;
  plan.rows_per_warp = rows_per_warp;
  if (plan.rows_per_warp == 0) {
    // Measured on an H200 (bench/results/2026-12-01-h200-nf4_gemv-v2.txt): 4 rows per warp
    // unless that leaves fewer than 16 warps per SM even at the most parts (k/v: 2 rows).
    plan.rows_per_warp = (out_features + 3) / 4 * max_parts >= SmCount() * 16 ? 4 : 2;
  }
  const int64_t groups = (out_features + plan.rows_per_warp - 1) / plan.rows_per_warp;
  while (plan.parts < max_parts && groups * plan.parts < target) plan.parts *= 2;
  return plan;
}

template <typename T, int M, int kRows>
cudaError_t LaunchRows(const T* x, const uint8_t* packed, const Nf4Absmax& absmax,
                       int64_t out_features, int64_t in_features, int parts, T* y,
                       cudaStream_t stream, bool overlapped) {
  Codes codes{};
  for (int i = 0; i < 16; ++i) codes.code[i] = kNf4Code[i];
  const int64_t rows_per_block = static_cast<int64_t>(kWarps / parts) * kRows;
  const dim3 grid(static_cast<unsigned>((out_features + rows_per_block - 1) / rows_per_block));
  return LaunchMaybeOverlapped(nf4_gemv_kernel<T, M, kRows>, grid, dim3(kThreads), 0, stream,
                               overlapped, x, packed, absmax.qabsmax, absmax.absmax2, absmax.code2,
                               absmax.offset, codes, out_features, in_features, parts, y);
}

template <typename T, int kRows>
cudaError_t Launch(const T* x, int64_t rows, const uint8_t* packed, const Nf4Absmax& absmax,
                   int64_t out_features, int64_t in_features, int parts, T* y, cudaStream_t stream,
                   bool overlapped) {
  switch (rows) {
#define LORAD_NF4_GEMV_ROWS(M)                                                                     \
  case M:                                                                                          \
    return LaunchRows<T, M, kRows>(x, packed, absmax, out_features, in_features, parts, y, stream, \
                                   overlapped);
    LORAD_NF4_GEMV_ROWS(1)
    LORAD_NF4_GEMV_ROWS(2)
    LORAD_NF4_GEMV_ROWS(3)
    LORAD_NF4_GEMV_ROWS(4)
    LORAD_NF4_GEMV_ROWS(5)
    LORAD_NF4_GEMV_ROWS(6)
    LORAD_NF4_GEMV_ROWS(7)
    LORAD_NF4_GEMV_ROWS(8)
#undef LORAD_NF4_GEMV_ROWS
    default:
      return cudaErrorInvalidValue;
  }
}

template <int kRows>
cudaError_t Dispatch(const void* x, FloatKind kind, int64_t rows, const uint8_t* packed,
                     const Nf4Absmax& absmax, int64_t out_features, int64_t in_features, int parts,
                     void* y, cudaStream_t s, bool overlapped) {
  switch (kind) {
    case FloatKind::kF32:
      return Launch<float, kRows>(static_cast<const float*>(x), rows, packed, absmax, out_features,
                                  in_features, parts, static_cast<float*>(y), s, overlapped);
    case FloatKind::kBF16:
      return Launch<__nv_bfloat16, kRows>(static_cast<const __nv_bfloat16*>(x), rows, packed,
                                          absmax, out_features, in_features, parts,
                                          static_cast<__nv_bfloat16*>(y), s, overlapped);
    case FloatKind::kF16:
      return Launch<__half, kRows>(static_cast<const __half*>(x), rows, packed, absmax,
                                   out_features, in_features, parts, static_cast<__half*>(y), s,
                                   overlapped);
  }
  return cudaErrorInvalidValue;
}

// rows_per_warp: 1, 2, 4, or 0 for the plan's choice.
const char* Run(int rows_per_warp, const void* x, FloatKind kind, int64_t rows,
                const uint8_t* packed, const Nf4Absmax& absmax, int64_t out_features,
                int64_t in_features, void* y, void* stream, bool overlapped) {
  if (!nf4_gemv_cuda_supports(rows, in_features)) {
    return "nf4_gemv_cuda: unsupported shape (needs 1..8 rows and in_features % 64 == 0)";
  }
  if (rows_per_warp != 0 && rows_per_warp != 1 && rows_per_warp != 2 && rows_per_warp != 4) {
    return "nf4_gemv_cuda: rows_per_warp must be 1, 2 or 4";
  }
  if (out_features <= 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  const Plan plan = MakePlan(rows_per_warp, out_features, in_features);
  cudaError_t err = cudaErrorInvalidValue;
  switch (plan.rows_per_warp) {
    case 1:
      err = Dispatch<1>(x, kind, rows, packed, absmax, out_features, in_features, plan.parts, y, s,
                        overlapped);
      break;
    case 2:
      err = Dispatch<2>(x, kind, rows, packed, absmax, out_features, in_features, plan.parts, y, s,
                        overlapped);
      break;
    case 4:
      err = Dispatch<4>(x, kind, rows, packed, absmax, out_features, in_features, plan.parts, y, s,
                        overlapped);
      break;
  }
  if (err == cudaSuccess) err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

bool nf4_gemv_cuda_supports(int64_t rows, int64_t in_features) {
  return rows >= 1 && rows <= kNf4GemvMaxRows && in_features > 0 &&
         in_features % kNf4BlockSize == 0;
}

const char* nf4_gemv_cuda_rows_per_warp(int rows_per_warp, const void* x, FloatKind kind,
                                        int64_t rows, const uint8_t* packed,
                                        const Nf4Absmax& absmax, int64_t out_features,
                                        int64_t in_features, void* y, void* stream) {
  if (rows_per_warp == 0) return "nf4_gemv_cuda: rows_per_warp must be 1, 2 or 4";
  return Run(rows_per_warp, x, kind, rows, packed, absmax, out_features, in_features, y, stream,
             false);
}

const char* nf4_gemv_cuda(const void* x, FloatKind kind, int64_t rows, const uint8_t* packed,
                          const Nf4Absmax& absmax, int64_t out_features, int64_t in_features,
                          void* y, void* stream) {
  return Run(0, x, kind, rows, packed, absmax, out_features, in_features, y, stream, false);
}

const char* nf4_gemv_cuda_overlapped(const void* x, FloatKind kind, int64_t rows,
                                     const uint8_t* packed, const Nf4Absmax& absmax,
                                     int64_t out_features, int64_t in_features, void* y,
                                     void* stream) {
  return Run(0, x, kind, rows, packed, absmax, out_features, in_features, y, stream, true);
}

}  // namespace lorad::kernels
