// CPU reference of kernels/paged_attention.h: the specification, written for clarity.
#include "kernels/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/bfloat16.h"

namespace lorad::kernels {
const char* paged_attention_check(const PagedAttentionShape& s) {
  if (s.rows < 0 || s.heads < 1 || s.kv_heads < 1 || s.head_dim < 1 || s.block_size < 1 ||
      s.max_blocks < 1) {
    return "paged attention: every dimension must be positive";
  }
  if (s.heads % s.kv_heads != 0) return "paged attention: kv_heads must divide heads";
  return "";
}

void paged_attention_cpu(const void* q, const void* k_pool, const void* v_pool, FloatKind kind,
                         const int32_t* block_tables, const int32_t* context_lens,
                         const PagedAttentionShape& shape, float scale, void* out) {
  const int64_t d_size = shape.head_dim;
  const int64_t group = shape.heads / shape.kv_heads;
  std::vector<float> scores;
  std::vector<float> acc(static_cast<size_t>(d_size));
  for (int64_t b = 0; b < shape.rows; ++b) {
    const int64_t n = context_lens[b];
    const int32_t* table = block_tables + b * shape.max_blocks;
    scores.assign(static_cast<size_t>(n), 0.0f);
    for (int64_t h = 0; h < shape.heads; ++h) {
      const int64_t g = h / group;
      const int64_t q_base = (b * shape.heads + h) * d_size;
      auto kv_base = [&](int64_t t) {
        const int64_t slot = static_cast<int64_t>(table[t / shape.block_size]) * shape.block_size +
                             t % shape.block_size;
        return (slot * shape.kv_heads + g) * d_size;
      };
      float max_score = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        float dot = 0.0f;
        for (int64_t d = 0; d < d_size; ++d) {
          dot += LoadFloat(q, kind, q_base + d) * LoadFloat(k_pool, kind, kv_base(t) + d);
        }
        scores[t] = dot * scale;
        max_score = std::max(max_score, scores[t]);
      }
      float sum = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        scores[t] = std::exp(scores[t] - max_score);
        sum += scores[t];
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t d = 0; d < d_size; ++d) {
          acc[d] += scores[t] * LoadFloat(v_pool, kind, kv_base(t) + d);
        }
      }
      for (int64_t d = 0; d < d_size; ++d) StoreFloat(out, kind, q_base + d, acc[d] / sum);
    }
  }
}

}  // namespace lorad::kernels
