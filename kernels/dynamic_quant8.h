// 8-bit blockwise dynamic quantization, bitsandbytes' quantize_blockwise / dequantize_blockwise.
// NF4 uses it for double quantization: the per-64 absmax values, minus their mean, are stored as
// 8-bit codes in blocks of 256 with one fp32 scale per block.
//
// Code book: kDynamicMapSigned, bitsandbytes' create_dynamic_map(signed=True): 256 sorted values
// in [-1, 1] (a sign, a dynamic exponent and a linear fraction per code).
//
// Quantization follows bitsandbytes' CPU kernel (quantize_cpu_impl): the scaled value is mapped
// to one of 65536 evenly spaced bins on [-1, 1] and the bin to the code nearest its centre. That
// is not always the code nearest the value itself, so "nearest code" would not be byte-compatible.
//
// Raw pointers and sizes; the CPU functions are the specification, the CUDA ones
// (dynamic_quant8.cu) match them bit for bit.
#pragma once

#include <cstdint>

namespace lorad::kernels {

inline constexpr int kDynamicQuant8BlockSize = 256;  // the block size of NF4's nested absmax
inline constexpr int kDynamicQuant8Bins = 65536;     // bitsandbytes' lookup-table resolution

// create_dynamic_map(signed=True) as bitsandbytes computes it (fp32, sorted ascending). Generated
// from bitsandbytes 0.50.2; tests/parity/nf4_parity_test.cpp checks it against the installed
// bitsandbytes bit for bit.
extern const float kDynamicMapSigned[256];

// Semantics: bin j (0 <= j < 65536) of `code` is the number of midpoints
//   m[i] = 0.5f * (code[i] + code[i + 1])   (fp32)
// strictly below the bin centre c_j = -1.0f + (2.0f * j) / 65535.0f (fp32). `code` must be sorted
// ascending. lut: [65536] uint8.
void dynamic_quant8_build_lut(const float* code, uint8_t* lut);

// Semantics, per block b of `blocksize` elements (the last may be short), x'[i] = x[i] - offset:
//   absmax[b] = max |x'[i]|   (NaN ignored)
//   absmax[b] == 0: q[i] = 0
//   else: s = clamp(x'[i] * (1.0f / absmax[b]), -1, 1) (NaN -> -1),
//         j = trunc(((s + 1.0f) * 0.5f) * 65535.0f + 0.5f),   each op rounded to fp32, no FMA
//         q[i] = bin j of `code` (dynamic_quant8_build_lut)
// x: [n] fp32; q: [n] uint8; absmax: [ceil(n / blocksize)] fp32; code: [256] sorted.
void dynamic_quant8_quantize_cpu(const float* x, int64_t n, float offset, int blocksize,
                                 const float* code, uint8_t* q, float* absmax);

// Semantics: y[i] = code[q[i]] * absmax[i / blocksize] + offset   (two fp32 roundings, no FMA).
// q: [n]; absmax: [ceil(n / blocksize)] fp32; code: [256]; y: [n] fp32.
void dynamic_quant8_dequantize_cpu(const uint8_t* q, const float* absmax, const float* code,
                                   int64_t n, int blocksize, float offset, float* y);

// Declared in every build, defined in CUDA builds only: a CPU build's callers name them in
// the lambdas RunKernel (engine/model/kernel_launch.h) never calls there.
// CUDA launchers: device pointers (code too), enqueued on `stream` (a cudaStream_t); each returns
// nullptr on success or the CUDA error string. blocksize must be 256 for the quantize launcher
// (one thread per element of a block).
const char* dynamic_quant8_quantize_cuda(const float* x, int64_t n, float offset, int blocksize,
                                         const float* code, uint8_t* q, float* absmax,
                                         void* stream);
const char* dynamic_quant8_dequantize_cuda(const uint8_t* q, const float* absmax, const float* code,
                                           int64_t n, int blocksize, float offset, float* y,
                                           void* stream);

}  // namespace lorad::kernels
