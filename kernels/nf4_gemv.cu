// CUDA implementation of kernels/nf4_gemv.h. Raw pointers only: no torch headers here.
//
// Decode is memory-bound: the packed weights are read once per call and nothing else is large, so
// the kernel is built to keep HBM busy:
//   - each warp owns kRowsPerWarp output rows; lane l reads 16-byte chunks l, l + 32, ... of each
//     row (coalesced 512-byte warp reads) through the non-coherent path without L1 allocation, so
//     the small x vector keeps L1 to itself;
//   - kUnroll chunks per row are requested before any is used, so enough bytes are in flight;
//   - the 16 NF4 levels and the 256 absmax codes sit in shared memory (16 distinct words: a warp's
//     lookups never conflict on a bank);
//   - each 16-byte chunk is 32 elements of one 64-block, so the sum over the chunk is scaled by
//     the block's absmax once; x is converted to fp32 once per chunk and reused for every row.
//
// Measured (bench/results/2026-12-01-h200-nf4_gemv.txt, H200, batch 1, bf16): 1.28-1.45x faster
// than the bf16 cuBLAS GEMV but only 25-37% of the copy bandwidth; 2 rows per warp beat 1 and 4
// except on the 1024-row k/v shape. The likely limit is issue and shared-memory throughput, not
// HBM: every element costs a shared-memory code lookup (32 per cycle per SM at most, about the
// rate HBM delivers NF4 elements) plus nibble extraction and an x conversion. Next steps: a
// software-pipelined loop (loads of the next chunks in flight while decoding), cheaper decode
// (pre-shifted nibble offsets), x converted once per block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/nf4_gemv.h"

namespace lorad::kernels {
namespace {

constexpr int kWarps = 4;               // warps per CUDA block
constexpr int kDefaultRowsPerWarp = 2;  // output rows per warp, sharing each x chunk
constexpr int kUnroll = 4;              // 16-byte weight loads in flight per lane and row

struct Codes {
  float code[16];
};

__device__ __forceinline__ uint4 LoadStreaming(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
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

// The 8 levels of one 32-bit word of packed weights (4 bytes, high nibble first).
__device__ __forceinline__ void Decode8(uint32_t word, const float* code, float out[8]) {
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    out[2 * b] = code[(word >> (8 * b + 4)) & 0xF];
    out[2 * b + 1] = code[(word >> (8 * b)) & 0xF];
  }
}

template <typename T, int M, int kRowsPerWarp>
__global__ void __launch_bounds__(kWarps * 32)
    nf4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                    const uint8_t* __restrict__ qabsmax, const float* __restrict__ absmax2,
                    const float* __restrict__ code2_global, float offset, Codes codes,
                    int64_t out_features, int64_t in_features, T* __restrict__ y) {
  __shared__ float code[16];
  __shared__ float code2[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code2[i] = code2_global[i];
  if (threadIdx.x < 16) code[threadIdx.x] = codes.code[threadIdx.x];
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t row0 =
      (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * kRowsPerWarp;
  if (row0 >= out_features) return;
  const int64_t chunks = in_features / 32;  // 16-byte chunks per row
  const int64_t blocks_per_row = in_features / kNf4BlockSize;

  bool valid[kRowsPerWarp];
  const uint4* wrow[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    valid[r] = row0 + r < out_features;
    // A missing last row re-reads row0 (always valid memory) and is never stored.
    wrow[r] =
        reinterpret_cast<const uint4*>(packed + (valid[r] ? row0 + r : row0) * (in_features / 2));
  }

  float acc[kRowsPerWarp][M];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  }

  for (int64_t j0 = lane; j0 < chunks; j0 += 32 * kUnroll) {
    uint4 w[kRowsPerWarp][kUnroll];
    uint8_t qa[kRowsPerWarp][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + 32 * u;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const bool in_row = j < chunks;
        w[r][u] = in_row ? LoadStreaming(wrow[r] + j) : make_uint4(0, 0, 0, 0);
        qa[r][u] = in_row && valid[r] ? qabsmax[(row0 + r) * blocks_per_row + j / 2] : 0;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + 32 * u;
      if (j >= chunks) break;
      float part[kRowsPerWarp][M];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) part[r][m] = 0.f;
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float wf[kRowsPerWarp][8];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const uint32_t word = c == 0   ? w[r][u].x
                                : c == 1 ? w[r][u].y
                                : c == 2 ? w[r][u].z
                                         : w[r][u].w;
          Decode8(word, code, wf[r]);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xv[8];
          Load8(x + m * in_features + j * 32 + c * 8, xv);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
            for (int e = 0; e < 8; ++e) part[r][m] = fmaf(wf[r][e], xv[e], part[r][m]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        // The block's absmax exactly as the CPU reference rebuilds it (no fused multiply-add).
        const int64_t b = (valid[r] ? row0 + r : row0) * blocks_per_row + j / 2;
        const float scale =
            __fadd_rn(__fmul_rn(code2[qa[r][u]], __ldg(absmax2 + (b >> 8))), offset);
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = fmaf(part[r][m], scale, acc[r][m]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && valid[r]) Store(y + m * out_features + row0 + r, v);
    }
  }
}

template <typename T, int M, int kRowsPerWarp>
void LaunchRows(const T* x, const uint8_t* packed, const Nf4Absmax& absmax, const Codes& codes,
                int64_t out_features, int64_t in_features, T* y, cudaStream_t stream) {
  constexpr int64_t kRowsPerBlock = kWarps * kRowsPerWarp;
  const int64_t grid = (out_features + kRowsPerBlock - 1) / kRowsPerBlock;
  nf4_gemv_kernel<T, M, kRowsPerWarp><<<grid, kWarps * 32, 0, stream>>>(x, packed, absmax.qabsmax, absmax.absmax2,
                                                          absmax.code2, absmax.offset, codes,
                                                          out_features, in_features, y);
}

template <typename T, int kRowsPerWarp>
void Launch(const T* x, int64_t rows, const uint8_t* packed, const Nf4Absmax& absmax,
            int64_t out_features, int64_t in_features, T* y, cudaStream_t stream) {
  Codes codes{};
  for (int i = 0; i < 16; ++i) codes.code[i] = kNf4Code[i];
  switch (rows) {
#define LORAD_NF4_GEMV_ROWS(M)                                                        \
  case M:                                                                             \
    LaunchRows<T, M, kRowsPerWarp>(x, packed, absmax, codes, out_features, in_features, y, stream); \
    break;
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
      break;
  }
}

template <int kRowsPerWarp>
const char* Dispatch(const void* x, FloatKind kind, int64_t rows, const uint8_t* packed,
                     const Nf4Absmax& absmax, int64_t out_features, int64_t in_features, void* y,
                     cudaStream_t s) {
  switch (kind) {
    case FloatKind::kF32:
      Launch<float, kRowsPerWarp>(static_cast<const float*>(x), rows, packed, absmax,
                                  out_features, in_features, static_cast<float*>(y), s);
      break;
    case FloatKind::kBF16:
      Launch<__nv_bfloat16, kRowsPerWarp>(static_cast<const __nv_bfloat16*>(x), rows, packed,
                                          absmax, out_features, in_features,
                                          static_cast<__nv_bfloat16*>(y), s);
      break;
    case FloatKind::kF16:
      Launch<__half, kRowsPerWarp>(static_cast<const __half*>(x), rows, packed, absmax,
                                   out_features, in_features, static_cast<__half*>(y), s);
      break;
  }
  const cudaError_t err = cudaGetLastError();
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
  if (!nf4_gemv_cuda_supports(rows, in_features)) {
    return "nf4_gemv_cuda: unsupported shape (needs 1..8 rows and in_features % 64 == 0)";
  }
  if (out_features <= 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (rows_per_warp) {
    case 1:
      return Dispatch<1>(x, kind, rows, packed, absmax, out_features, in_features, y, s);
    case 2:
      return Dispatch<2>(x, kind, rows, packed, absmax, out_features, in_features, y, s);
    case 4:
      return Dispatch<4>(x, kind, rows, packed, absmax, out_features, in_features, y, s);
    default:
      return "nf4_gemv_cuda: rows_per_warp must be 1, 2 or 4";
  }
}

const char* nf4_gemv_cuda(const void* x, FloatKind kind, int64_t rows, const uint8_t* packed,
                          const Nf4Absmax& absmax, int64_t out_features, int64_t in_features,
                          void* y, void* stream) {
  return nf4_gemv_cuda_rows_per_warp(kDefaultRowsPerWarp, x, kind, rows, packed, absmax,
                                     out_features, in_features, y, stream);
}

}  // namespace lorad::kernels
