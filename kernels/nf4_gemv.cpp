#include "kernels/nf4_gemv.h"

#include <vector>

namespace lorad::kernels {

void nf4_gemv_with_code_cpu(const float code[16], const float* x, int64_t rows,
                            const uint8_t* packed, const float* absmax, int64_t out_features,
                            int64_t in_features, float* y) {
  // One dequantized row of W at a time: the reference stays obviously right and small in memory.
  std::vector<float> w(static_cast<size_t>(in_features));
  for (int64_t o = 0; o < out_features; ++o) {
    const int64_t first = o * in_features;
    for (int64_t k = 0; k < in_features; ++k) {
      const int64_t i = first + k;
      const uint8_t byte = packed[i / 2];
      const uint8_t q = i % 2 == 0 ? byte >> 4 : byte & 0x0F;
      w[k] = code[q] * absmax[i / kNf4BlockSize];
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * in_features;
      float acc = 0.f;
      for (int64_t k = 0; k < in_features; ++k) acc += xr[k] * w[k];
      y[r * out_features + o] = acc;
    }
  }
}

void nf4_gemv_cpu(const float* x, int64_t rows, const uint8_t* packed, const float* absmax,
                  int64_t out_features, int64_t in_features, float* y) {
  nf4_gemv_with_code_cpu(kNf4Code, x, rows, packed, absmax, out_features, in_features, y);
}

}  // namespace lorad::kernels
