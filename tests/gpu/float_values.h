// Random fp32 / bf16 test data as raw bytes (what the kernels read) and element access back as
// fp32, for the GPU tests of kernels that take a FloatKind.
#pragma once

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/bfloat16.h"
#include "kernels/float_kind.h"

namespace lorad::kernels::gpu_test {

// n normal(0, stddev) values, rounded to `kind` (fp32 or bf16), as bytes.
inline std::vector<char> RandomValues(size_t n, FloatKind kind, uint32_t seed,
                                      float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, stddev);
  std::vector<char> bytes(n * FloatKindSize(kind));
  for (size_t i = 0; i < n; ++i)
    StoreFloat(bytes.data(), kind, static_cast<int64_t>(i), normal(rng));
  return bytes;
}

// Element i of fp32 or bf16 bytes, as fp32.
inline float ValueAt(const std::vector<char>& bytes, FloatKind kind, size_t i) {
  return LoadFloat(bytes.data(), kind, static_cast<int64_t>(i));
}

}  // namespace lorad::kernels::gpu_test
