// CPU reference of kernels/cross_entropy.h: the specification, written for clarity.
#include "kernels/cross_entropy.h"

#include <cmath>
#include <limits>

#include "kernels/bfloat16.h"

namespace lorad::kernels {

void cross_entropy_rows_cpu(const void* logits, FloatKind kind, const int64_t* targets,
                            int64_t rows, int64_t vocab, float* loss, void* grad) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * vocab;
    const int64_t t = targets[r];
    if (t < 0 || t >= vocab) {
      loss[r] = 0.0f;
      if (grad != nullptr) {
        for (int64_t j = 0; j < vocab; ++j) StoreFloat(grad, kind, base + j, 0.0f);
      }
      continue;
    }
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < vocab; ++j) m = std::fmax(m, LoadFloat(logits, kind, base + j));
    double s = 0.0;  // in double: the sum's order is free, and this one is nearly exact
    for (int64_t j = 0; j < vocab; ++j) s += std::exp(LoadFloat(logits, kind, base + j) - m);
    const auto lse = static_cast<float>(m + std::log(s));
    loss[r] = lse - LoadFloat(logits, kind, base + t);
    if (grad == nullptr) continue;
    for (int64_t j = 0; j < vocab; ++j) {
      const float p = std::exp(LoadFloat(logits, kind, base + j) - lse);
      StoreFloat(grad, kind, base + j, j == t ? p - 1.0f : p);
    }
  }
}

}  // namespace lorad::kernels
