#include "kernels/nf4.h"

#include <algorithm>
#include <cmath>

namespace lorad::kernels {

uint8_t nf4_nearest_index(float x) {
  // Counting (rather than searching) keeps the rule obvious: strictly above a midpoint selects
  // the upper level, so a value exactly on a midpoint keeps the lower one; NaN compares false.
  uint8_t index = 0;
  for (int i = 0; i < 15; ++i) index += x > kNf4Midpoints.v[i] ? 1 : 0;
  return index;
}

void nf4_quantize_cpu(const float* w, int64_t n, uint8_t* packed, float* absmax) {
  const int64_t blocks = Nf4Blocks(n);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kNf4BlockSize;
    const int64_t end = std::min(n, begin + kNf4BlockSize);
    float amax = 0.f;
    for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(w[i]));
    absmax[b] = amax;
    // bitsandbytes clamps the divisor to 1e-38 (a subnormal float), so an all-zero block scales
    // to 0 and stores the index of 0.0.
    const float a = std::max(amax, 1e-38f);
    const bool full = end - begin == kNf4BlockSize;
    const float inv = 1.0f / a;
    for (int64_t i = begin; i < end; ++i) {
      // A full block multiplies by the reciprocal, the short tail divides: two different
      // roundings, both as bitsandbytes computes them.
      const float s = std::clamp(full ? w[i] * inv : w[i] / a, -1.0f, 1.0f);
      const uint8_t q = nf4_nearest_index(s);
      if (i % 2 == 0) {
        packed[i / 2] = static_cast<uint8_t>(q << 4 | kNf4ZeroIndex);
      } else {
        packed[i / 2] = static_cast<uint8_t>((packed[i / 2] & 0xF0) | q);
      }
    }
  }
}

void nf4_dequantize_cpu(const uint8_t* packed, const float* absmax, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = packed[i / 2];
    const uint8_t q = i % 2 == 0 ? byte >> 4 : byte & 0x0F;
    out[i] = kNf4Code[q] * absmax[i / kNf4BlockSize];
  }
}

}  // namespace lorad::kernels
