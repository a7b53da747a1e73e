// 4-bit GEMV for decode: y = x @ W^T with W held as NF4 (kernels/nf4.h), for a few rows of x.
//
// Semantics: y[r, o] = sum_k x[r, k] * W[o, k],   W[o, k] = kNf4Code[q(o * in + k)] * absmax[b],
//            b = (o * in + k) / 64,  r < rows, o < out_features, k < in_features.
// The CPU reference dequantizes W in fp32 and accumulates in fp32 in order k = 0, 1, ...; the CUDA
// kernel reads the packed weights and the double-quantized absmax directly, accumulates in fp32
// in a different order, and rounds y to the dtype of x, so it matches the reference within a
// tolerance, not bit for bit.
#pragma once

#include <cstdint>

#include "kernels/float_kind.h"
#include "kernels/nf4.h"

namespace lorad::kernels {

// The CUDA kernel is written for decode: up to this many rows of x per call.
inline constexpr int kNf4GemvMaxRows = 8;

// x: [rows, in_features] fp32; packed: [out_features * in_features / 2] uint8 (row-major W);
// absmax: [Nf4Blocks(out_features * in_features)] fp32; y: [rows, out_features] fp32.
void nf4_gemv_cpu(const float* x, int64_t rows, const uint8_t* packed, const float* absmax,
                  int64_t out_features, int64_t in_features, float* y);

// nf4_gemv_cpu with another 16-level code book in place of kNf4Code (kernels/nf4_mma.h: the levels
// rounded to the activations' type, as tensor cores multiply them).
void nf4_gemv_with_code_cpu(const float code[16], const float* x, int64_t rows,
                            const uint8_t* packed, const float* absmax, int64_t out_features,
                            int64_t in_features, float* y);

// Declared in every build, defined in CUDA builds only: a CPU build's callers name them in
// the lambdas RunKernel (engine/model/kernel_launch.h) never calls there.
// Whether nf4_gemv_cuda handles this problem; otherwise dequantize + matmul. Needs
// in_features % 64 == 0 (every row starts a block and 16-byte loads stay aligned),
// 1 <= rows <= kNf4GemvMaxRows, and x and y 16-byte aligned (checked by the caller).
bool nf4_gemv_cuda_supports(int64_t rows, int64_t in_features);

// Device pointers; x and y of `kind` (fp32, bf16 or fp16), y: [rows, out_features] row-major.
// absmax: device pointers plus the host-side offset. Enqueued on `stream` (a cudaStream_t);
// returns nullptr on success or the CUDA error string.
const char* nf4_gemv_cuda(const void* x, FloatKind kind, int64_t rows, const uint8_t* packed,
                          const Nf4Absmax& absmax, int64_t out_features, int64_t in_features,
                          void* y, void* stream);

// nf4_gemv_cuda launched with programmatic dependent launch (sm_90+; elsewhere a plain launch):
// the kernel may start while the kernel before it on `stream` is still running, and reads the
// weights (packed, qabsmax, absmax2, code2) before waiting for that kernel to finish; it reads x
// and writes y only after. So the caller promises that the kernel just before it on the stream
// does not write the weights. In a chain of decode kernels this overlaps one kernel's weight
// fetch with its predecessor's tail.
const char* nf4_gemv_cuda_overlapped(const void* x, FloatKind kind, int64_t rows,
                                     const uint8_t* packed, const Nf4Absmax& absmax,
                                     int64_t out_features, int64_t in_features, void* y,
                                     void* stream);

// nf4_gemv_cuda with a chosen number of output rows per warp (1, 2 or 4; nf4_gemv_cuda picks one
// from the shape and the SM count): more rows share each x chunk, fewer give more warps. For
// bench/nf4_gemv_bench.cu, which times the variants side by side.
const char* nf4_gemv_cuda_rows_per_warp(int rows_per_warp, const void* x, FloatKind kind,
                                        int64_t rows, const uint8_t* packed,
                                        const Nf4Absmax& absmax, int64_t out_features,
                                        int64_t in_features, void* y, void* stream);

}  // namespace lorad::kernels
