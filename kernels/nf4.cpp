#include "kernels/nf4.h"

#include <algorithm>
#include <cmath>

namespace lorad::kernels {

const float kNf4Code[16] = {
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

uint8_t nf4_nearest_index(float x) {
  // Walk the midpoints between neighbouring levels: strictly above a midpoint selects the upper
  // level, so a value exactly on a midpoint keeps the lower one.
  uint8_t index = 0;
  for (int i = 0; i < 15; ++i) {
    const float midpoint = 0.5f * (kNf4Code[i] + kNf4Code[i + 1]);
    if (x > midpoint) index = static_cast<uint8_t>(i + 1);
  }
  return index;
}

void nf4_quantize_cpu(const float* w, int64_t n, uint8_t* packed, float* absmax) {
  for (int64_t block = 0; block * kNf4BlockSize < n; ++block) {
    const float* wb = w + block * kNf4BlockSize;
    float amax = 0.f;
    for (int i = 0; i < kNf4BlockSize; ++i) amax = std::max(amax, std::fabs(wb[i]));
    absmax[block] = amax;
    const float inv = amax > 0.f ? 1.f / amax : 0.f;
    for (int i = 0; i < kNf4BlockSize; i += 2) {
      const uint8_t hi = nf4_nearest_index(wb[i] * inv);
      const uint8_t lo = nf4_nearest_index(wb[i + 1] * inv);
      packed[(block * kNf4BlockSize + i) / 2] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

void nf4_dequantize_cpu(const uint8_t* packed, const float* absmax, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 2) {
    const uint8_t byte = packed[i / 2];
    const float scale = absmax[i / kNf4BlockSize];
    out[i] = kNf4Code[byte >> 4] * scale;
    out[i + 1] = kNf4Code[byte & 0x0F] * scale;
  }
}

}  // namespace lorad::kernels
