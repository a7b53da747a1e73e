// CPU reference of kernels/layer_ops.h: the specification, written for clarity.
#include "kernels/layer_ops.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/bfloat16.h"

namespace lorad::kernels {
namespace {

// round_T: the value T holds for v, as fp32.
float Round(FloatKind kind, float v) {
  return kind == FloatKind::kF32 ? v : bf16_to_float(float_to_bf16(v));
}

}  // namespace

void rms_norm_cpu(const void* x, const void* weight, FloatKind kind, int64_t rows, int64_t width,
                  float eps, void* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float sum = 0.0f;
    for (int64_t i = 0; i < width; ++i) {
      const float v = LoadFloat(x, kind, r * width + i);
      sum += v * v;
    }
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(width) + eps);
    for (int64_t i = 0; i < width; ++i) {
      const float normed = Round(kind, LoadFloat(x, kind, r * width + i) * inv);
      StoreFloat(out, kind, r * width + i, LoadFloat(weight, kind, i) * normed);
    }
  }
}

void add_rms_norm_cpu(const void* x, const void* delta, const void* weight, FloatKind kind,
                      int64_t rows, int64_t width, float eps, void* sum, void* out) {
  for (int64_t i = 0; i < rows * width; ++i) {
    StoreFloat(sum, kind, i, LoadFloat(x, kind, i) + LoadFloat(delta, kind, i));
  }
  rms_norm_cpu(sum, weight, kind, rows, width, eps, out);
}

void rotary_cpu(const void* x, const void* cos, const void* sin, FloatKind kind, int64_t rows,
                int64_t heads, int64_t head_dim, void* out) {
  const int64_t half = head_dim / 2;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = (r * heads + h) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        const float rot =
            d < half ? -LoadFloat(x, kind, base + d + half) : LoadFloat(x, kind, base + d - half);
        const float a =
            Round(kind, LoadFloat(x, kind, base + d) * LoadFloat(cos, kind, r * head_dim + d));
        const float b = Round(kind, rot * LoadFloat(sin, kind, r * head_dim + d));
        StoreFloat(out, kind, base + d, a + b);
      }
    }
  }
}

void rotary_store_cpu(const RotaryStoreArgs& a, FloatKind kind) {
  const size_t element = kind == FloatKind::kF32 ? 4 : 2;
  const int64_t kv_row = a.kv_heads * a.head_dim;  // elements of one row of k (and of a slot)
  rotary_cpu(a.q, a.cos, a.sin, kind, a.rows, a.heads, a.head_dim, a.q_out);
  std::vector<unsigned char> k_rotated(static_cast<size_t>(a.rows * kv_row) * element);
  rotary_cpu(a.k, a.cos, a.sin, kind, a.rows, a.kv_heads, a.head_dim, k_rotated.data());
  const size_t bytes = static_cast<size_t>(kv_row) * element;
  for (int64_t r = 0; r < a.rows; ++r) {
    const size_t to = static_cast<size_t>(a.slots[r]) * bytes;
    std::memcpy(static_cast<unsigned char*>(a.k_pool) + to, k_rotated.data() + r * bytes, bytes);
    std::memcpy(static_cast<unsigned char*>(a.v_pool) + to,
                static_cast<const unsigned char*>(a.v) + r * bytes, bytes);
  }
}

void silu_mul_cpu(const void* gate, const void* up, FloatKind kind, int64_t n, void* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = LoadFloat(gate, kind, i);
    const float silu = Round(kind, g / (1.0f + std::exp(-g)));
    StoreFloat(out, kind, i, silu * LoadFloat(up, kind, i));
  }
}

void rms_norm_backward_cpu(const void* x, const void* weight, const void* dy, FloatKind kind,
                           int64_t rows, int64_t width, float eps, void* dx) {
  for (int64_t r = 0; r < rows; ++r) {
    float squares = 0.0f;
    float dot = 0.0f;  // sum_j g[j] * x[j]
    for (int64_t i = 0; i < width; ++i) {
      const float v = LoadFloat(x, kind, r * width + i);
      squares += v * v;
      dot += Round(kind, LoadFloat(dy, kind, r * width + i) * LoadFloat(weight, kind, i)) * v;
    }
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(width) + eps);
    const float along_x = inv * inv * inv * dot / static_cast<float>(width);
    for (int64_t i = 0; i < width; ++i) {
      const float g = Round(kind, LoadFloat(dy, kind, r * width + i) * LoadFloat(weight, kind, i));
      StoreFloat(dx, kind, r * width + i, g * inv - LoadFloat(x, kind, r * width + i) * along_x);
    }
  }
}

void silu_mul_backward_cpu(const void* gate, const void* up, const void* dy, FloatKind kind,
                           int64_t n, void* d_gate, void* d_up) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = LoadFloat(gate, kind, i);
    const float grad = LoadFloat(dy, kind, i);
    const float e = 1.0f + std::exp(-g);
    const float s = 1.0f / e;
    StoreFloat(d_up, kind, i, grad * Round(kind, g / e));
    const float d_silu = Round(kind, grad * LoadFloat(up, kind, i));
    StoreFloat(d_gate, kind, i, d_silu * (s * (1.0f + g * (1.0f - s))));
  }
}

}  // namespace lorad::kernels
