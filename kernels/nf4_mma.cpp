#include "kernels/nf4_mma.h"

#include <cstring>
#include <vector>

#include "kernels/bfloat16.h"
#include "kernels/layer_ops.h"
#include "kernels/nf4_gemv.h"

namespace lorad::kernels {
namespace {

// Round to nearest, ties to even, keeping `bits` mantissa bits. Enough for the NF4 levels: all of
// them are 0, +-1 or normal numbers well inside bf16's and fp16's ranges.
float RoundMantissa(float v, int bits) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const int drop = 23 - bits;
  u += (1u << (drop - 1)) - 1u + ((u >> drop) & 1u);
  u &= ~((1u << drop) - 1u);
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace

void nf4_code_rounded_to(FloatKind kind, float code[16]) {
  for (int i = 0; i < 16; ++i) {
    switch (kind) {
      case FloatKind::kF32:
        code[i] = kNf4Code[i];
        break;
      case FloatKind::kBF16:
        code[i] = bf16_to_float(float_to_bf16(kNf4Code[i]));
        break;
      case FloatKind::kF16:
        code[i] = RoundMantissa(kNf4Code[i], 10);
        break;
    }
  }
}

void nf4_mma_cpu(const float* x, int64_t rows, const uint8_t* packed, const float* absmax,
                 int64_t out_features, int64_t in_features, FloatKind kind, float* y) {
  float code[16];
  nf4_code_rounded_to(kind, code);
  nf4_gemv_with_code_cpu(code, x, rows, packed, absmax, out_features, in_features, y);
}

void nf4_mma_silu_mul_cpu(const float* x, int64_t rows, const uint8_t* gate_packed,
                          const float* gate_absmax, const uint8_t* up_packed,
                          const float* up_absmax, int64_t out_features, int64_t in_features,
                          float* out) {
  const int64_t n = rows * out_features;
  std::vector<float> gate(n), up(n);
  nf4_mma_cpu(x, rows, gate_packed, gate_absmax, out_features, in_features, FloatKind::kBF16,
              gate.data());
  nf4_mma_cpu(x, rows, up_packed, up_absmax, out_features, in_features, FloatKind::kBF16,
              up.data());
  std::vector<uint16_t> gate16(n), up16(n), out16(n);
  for (int64_t i = 0; i < n; ++i) {
    gate16[i] = float_to_bf16(gate[i]);
    up16[i] = float_to_bf16(up[i]);
  }
  silu_mul_cpu(gate16.data(), up16.data(), FloatKind::kBF16, n, out16.data());
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(out16[i]);
}

}  // namespace lorad::kernels
