// NF4 4-bit quantization in bitsandbytes' layout, so checkpoints interoperate.
//
// Format (bitsandbytes quantize_4bit, quant_type="nf4", blocksize=64):
//   - the weight is flattened row-major and cut into blocks of kNf4BlockSize elements (the last
//     block may be short);
//   - absmax[b] = max |w| over block b (fp32);
//   - each element is scaled into [-1, 1] by its block's absmax and stored as the index of the
//     nearest of the 16 kNf4Code levels;
//   - two indices per byte, the first element of the pair in the high nibble; an odd count pads
//     the last low nibble with the index of 0.
// Dequantization: w = kNf4Code[index] * absmax[b].
// With double quantization the absmax values are themselves 8-bit codes (see Nf4Absmax and
// kernels/dynamic_quant8.h).
//
// Every function here takes raw pointers and sizes; the CPU versions are the specification, the
// CUDA versions (nf4.cu) match them bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/float_kind.h"

namespace lorad::kernels {

inline constexpr int kNf4BlockSize = 64;
// Index of 0.0 in kNf4Code: what bitsandbytes stores for the padding nibble of an odd count.
inline constexpr uint8_t kNf4ZeroIndex = 7;

// The 16 NF4 levels (normal-distribution quantiles scaled to [-1, 1]), bitsandbytes' values.
inline constexpr float kNf4Code[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// The decision boundaries: v[i] = 0.5f * (kNf4Code[i] + kNf4Code[i + 1]) in fp32, as bitsandbytes
// computes them ((code[:-1] + code[1:]) / 2). Evaluated at compile time with IEEE rounding.
struct Nf4Midpoints {
  float v[15];
};
constexpr Nf4Midpoints MakeNf4Midpoints() {
  Nf4Midpoints m{};
  for (int i = 0; i < 15; ++i) m.v[i] = 0.5f * (kNf4Code[i] + kNf4Code[i + 1]);
  return m;
}
inline constexpr Nf4Midpoints kNf4Midpoints = MakeNf4Midpoints();

inline int64_t Nf4PackedBytes(int64_t n) { return (n + 1) / 2; }
inline int64_t Nf4Blocks(int64_t n) { return (n + kNf4BlockSize - 1) / kNf4BlockSize; }

// Semantics: the number of midpoints strictly below x, i.e. the nearest level with ties at a
// midpoint going to the lower level (torch.bucketize(x, midpoints), right=False); NaN -> 0.
uint8_t nf4_nearest_index(float x);

// Semantics (bitsandbytes' quantize_4bit CPU path, bit for bit):
//   absmax[b] = max_{i in b} |w[i]|
//   a = max(absmax[b], 1e-38f)
//   s[i] = clamp(w[i] * (1.0f / a), -1, 1)   for a full block of 64
//   s[i] = clamp(w[i] / a, -1, 1)            for the short last block (n % 64 != 0)
//   q[i] = nf4_nearest_index(s[i]); packed[j] = q[2j] << 4 | q[2j+1]  (q[n] = kNf4ZeroIndex)
// w: [n] fp32; packed: [Nf4PackedBytes(n)] uint8; absmax: [Nf4Blocks(n)] fp32.
void nf4_quantize_cpu(const float* w, int64_t n, uint8_t* packed, float* absmax);

// Semantics: out[i] = kNf4Code[q[i]] * absmax[i / 64] (one fp32 multiply).
// packed: [Nf4PackedBytes(n)]; absmax: [Nf4Blocks(n)] fp32; out: [n] fp32.
void nf4_dequantize_cpu(const uint8_t* packed, const float* absmax, int64_t n, float* out);

// The double-quantized absmax of one NF4 tensor (bitsandbytes compress_statistics=True):
//   absmax[b] = code2[qabsmax[b]] * absmax2[b / 256] + offset
// as two fp32 roundings (multiply, then add; never a fused multiply-add), which is what
// bitsandbytes' dequantize_blockwise followed by `absmax += offset` computes.
struct Nf4Absmax {
  const uint8_t* qabsmax = nullptr;  // [blocks] uint8
  const float* absmax2 = nullptr;    // [ceil(blocks / 256)] fp32
  const float* code2 = nullptr;      // [256] fp32, the 8-bit dynamic code book
  float offset = 0.f;                // mean of the first-level absmax
};

// Declared in every build, defined in CUDA builds only: a CPU build's callers name them in
// the lambdas RunKernel (engine/model/kernel_launch.h) never calls there.
// CUDA launchers: device pointers, enqueued on `stream` (a cudaStream_t). Each returns nullptr on
// success or the CUDA error string of the launch. Sizes are not re-validated: the torch-facing
// wrapper (engine/model/nf4_tensor.cpp) checks them.

// Same result as nf4_quantize_cpu for w converted to fp32 (the conversion is exact).
// w: [n] of `w_kind`.
const char* nf4_quantize_cuda(const void* w, FloatKind w_kind, int64_t n, uint8_t* packed,
                              float* absmax, void* stream);

// Same result as nf4_dequantize_cpu, then rounded to `out_kind` (round to nearest even).
// out: [n] of `out_kind`.
const char* nf4_dequantize_cuda(const uint8_t* packed, const float* absmax, int64_t n, void* out,
                                FloatKind out_kind, void* stream);
// The same from the double-quantized absmax, rebuilt as Nf4Absmax says inside the one kernel
// (dynamic_quant8_dequantize_cpu then nf4_dequantize_cpu, bit for bit). packed must be 8-byte and
// out 16-byte aligned (what torch allocations are).
const char* nf4_dequantize_double_cuda(const uint8_t* packed, const Nf4Absmax& absmax, int64_t n,
                                       void* out, FloatKind out_kind, void* stream);

}  // namespace lorad::kernels
