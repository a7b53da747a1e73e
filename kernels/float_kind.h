// FloatKind: the element type of a raw float buffer handed to a kernel. Kernels take raw pointers
// (no torch headers), so the wrapper says what the bytes are.
#pragma once

#include <cstddef>

namespace lorad::kernels {

enum class FloatKind {
  kF32,   // IEEE binary32
  kBF16,  // bfloat16: the upper 16 bits of a binary32
  kF16,   // IEEE binary16
};

inline size_t FloatKindSize(FloatKind kind) { return kind == FloatKind::kF32 ? 4 : 2; }

}  // namespace lorad::kernels
