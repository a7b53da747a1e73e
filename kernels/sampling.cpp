// CPU reference of kernels/sampling.h: the specification, written for clarity (maps, sorts,
// sequential sums), with the arithmetic of kernels/sampling_math.h so sampling.cu can match it
// bit for bit.
#include "kernels/sampling.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <map>
#include <utility>
#include <vector>

#include "kernels/sampling_math.h"

namespace lorad::kernels {
namespace {

namespace sm = sampling_math;

constexpr float kRemoved = -std::numeric_limits<float>::infinity();

bool HasPenalty(const SamplingRow& r) {
  return r.repetition_penalty != 1.0f || r.presence_penalty != 0.0f || r.frequency_penalty != 0.0f;
}

// The largest value (-inf for an empty or all -inf row).
float RowMax(const float* x, int64_t vocab) {
  float m = kRemoved;
  for (int64_t j = 0; j < vocab; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

int32_t Argmax(const float* x, int64_t vocab) {
  int64_t best = 0;
  for (int64_t j = 1; j < vocab; ++j) best = x[j] > x[best] ? j : best;  // ties: the first
  return static_cast<int32_t>(best);
}

void RemoveBelow(float* x, int64_t vocab, float cut) {
  for (int64_t j = 0; j < vocab; ++j) {
    if (x[j] < cut) x[j] = kRemoved;
  }
}

void TopK(float* x, int64_t vocab, int32_t k) {
  std::vector<float> sorted(x, x + vocab);
  std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<float>());
  RemoveBelow(x, vocab, sorted[k - 1]);
}

void TopP(float* x, int64_t vocab, float top_p) {
  const float m = RowMax(x, vocab);
  std::vector<std::pair<float, uint64_t>> by_value(vocab);  // (z, mass)
  uint64_t total = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    by_value[j] = {x[j], sm::Mass(sm::Sub(x[j], m))};
    total += by_value[j].second;
  }
  const uint64_t threshold = sm::TopPThreshold(top_p, total);
  std::sort(by_value.begin(), by_value.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  // The smallest z whose cumulative mass (every token with a z <= it) exceeds the threshold is
  // the first kept value; when rounding leaves none, keep the largest z.
  float cut = m;
  uint64_t cumulative = 0;
  for (size_t i = 0; i < by_value.size();) {
    size_t end = i;
    while (end < by_value.size() && by_value[end].first == by_value[i].first) {
      cumulative += by_value[end++].second;
    }
    if (cumulative > threshold) {
      cut = by_value[i].first;
      break;
    }
    i = end;
  }
  RemoveBelow(x, vocab, cut);
}

void MinP(float* x, int64_t vocab, float min_p) {
  const float m = RowMax(x, vocab);
  for (int64_t j = 0; j < vocab; ++j) {
    if (sm::ExpNonPositive(sm::Sub(x[j], m)) < min_p) x[j] = kRemoved;
  }
}

}  // namespace

void sampling_penalties_cpu(float* logits, int64_t batch, int64_t vocab, const SamplingRow* rows,
                            const TokenHistory& history) {
  for (int64_t b = 0; b < batch; ++b) {
    const SamplingRow& row = rows[b];
    if (!HasPenalty(row)) continue;  // every step below would be the identity
    // token -> occurrences among the generated tokens (prompt tokens enter with 0).
    std::map<int32_t, int64_t> counts;
    for (int64_t i = history.row_begin[b]; i < history.row_begin[b + 1]; ++i) {
      const int32_t t = history.tokens[i];
      if (t < 0 || t >= vocab) continue;
      int64_t& c = counts[t];
      if (i >= history.generated_begin[b]) ++c;
    }
    float* x = logits + b * vocab;
    for (const auto& [t, c] : counts) {
      float v = x[t];
      v = v < 0.0f ? sm::Mul(v, row.repetition_penalty) : sm::Div(v, row.repetition_penalty);
      if (c > 0) {
        v = sm::Sub(sm::Sub(v, sm::Mul(row.frequency_penalty, static_cast<float>(c))),
                    row.presence_penalty);
      }
      x[t] = v;
    }
  }
}

void sampling_warp_cpu(float* logits, int64_t batch, int64_t vocab, const SamplingRow* rows) {
  for (int64_t b = 0; b < batch; ++b) {
    const SamplingRow& row = rows[b];
    if (!(row.temperature > 0.0f)) continue;  // greedy
    float* x = logits + b * vocab;
    for (int64_t j = 0; j < vocab; ++j) x[j] = sm::Div(x[j], row.temperature);
    if (row.top_k > 0 && row.top_k < vocab) TopK(x, vocab, row.top_k);
    if (row.top_p < 1.0f) TopP(x, vocab, row.top_p);
    if (row.min_p > 0.0f) MinP(x, vocab, row.min_p);
  }
}

void sampling_draw_cpu(const float* logits, int64_t batch, int64_t vocab, const SamplingRow* rows,
                       int32_t* tokens) {
  for (int64_t b = 0; b < batch; ++b) {
    const SamplingRow& row = rows[b];
    const float* x = logits + b * vocab;
    tokens[b] = Argmax(x, vocab);
    if (!(row.temperature > 0.0f)) continue;
    const float m = RowMax(x, vocab);
    std::vector<uint64_t> mass(vocab);
    uint64_t total = 0;
    for (int64_t j = 0; j < vocab; ++j) total += mass[j] = sm::Mass(sm::Sub(x[j], m));
    if (total == 0) continue;  // no finite logit: keep the argmax
    const uint64_t u = sm::ScaleDraw(sm::DrawBits(row.seed, row.step), total);
    uint64_t cumulative = 0;
    for (int64_t j = 0; j < vocab; ++j) {
      cumulative += mass[j];
      if (cumulative > u) {
        tokens[b] = static_cast<int32_t>(j);
        break;
      }
    }
  }
}

}  // namespace lorad::kernels
