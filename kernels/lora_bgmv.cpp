#include "kernels/lora_bgmv.h"

#include <vector>

#include "kernels/bfloat16.h"

namespace lorad::kernels {
namespace {

float Load(const void* p, FloatKind kind, int64_t i) {
  return kind == FloatKind::kF32 ? static_cast<const float*>(p)[i]
                                 : bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

void Store(void* p, FloatKind kind, int64_t i, float v) {
  if (kind == FloatKind::kF32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
  }
}

// The semantics of lora_bgmv.h for one row, in the order written there.
void ApplyRow(const void* x, FloatKind kind, int64_t row, int64_t in_features, int32_t slot,
              const LoraAdapterTable& table, int64_t out_features, void* y) {
  if (slot < 0 || slot >= table.num_slots) return;
  const int32_t rank = table.rank[slot];
  const void* a = table.a[slot];
  const void* b = table.b[slot];
  std::vector<float> t(static_cast<size_t>(rank));
  for (int32_t r = 0; r < rank; ++r) {
    float acc = 0.f;
    for (int64_t k = 0; k < in_features; ++k) {
      acc += Load(a, kind, r * in_features + k) * Load(x, kind, row * in_features + k);
    }
    t[r] = acc;
  }
  const float scale = table.scale[slot];
  for (int64_t o = 0; o < out_features; ++o) {
    float acc = 0.f;
    for (int32_t r = 0; r < rank; ++r) acc += Load(b, kind, o * rank + r) * t[r];
    const int64_t i = row * out_features + o;
    Store(y, kind, i, Load(y, kind, i) + scale * acc);
  }
}

}  // namespace

void lora_bgmv_cpu(const void* x, FloatKind kind, int64_t rows, int64_t in_features,
                   const int32_t* adapter_index, const LoraAdapterTable& table,
                   int64_t out_features, void* y) {
  if (kind == FloatKind::kF16) return;
  for (int64_t row = 0; row < rows; ++row) {
    ApplyRow(x, kind, row, in_features, adapter_index[row], table, out_features, y);
  }
}

void lora_sgmv_cpu(const void* x, FloatKind kind, int64_t in_features,
                   const int64_t* segment_starts, const int32_t* segment_adapter,
                   int64_t num_segments, const LoraAdapterTable& table, int64_t out_features,
                   void* y) {
  if (kind == FloatKind::kF16) return;
  for (int64_t g = 0; g < num_segments; ++g) {
    for (int64_t row = segment_starts[g]; row < segment_starts[g + 1]; ++row) {
      ApplyRow(x, kind, row, in_features, segment_adapter[g], table, out_features, y);
    }
  }
}

}  // namespace lorad::kernels
