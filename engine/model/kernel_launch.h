// Glue between libtorch tensors and the raw-pointer kernels of kernels/: the FloatKind of a
// tensor's dtype, the device's current CUDA stream, and a launcher error turned into a c10::Error
// (the engine's callers turn that into a Status).
#pragma once

#include <torch/torch.h>

#include <optional>

#include "kernels/float_kind.h"

#if defined(LORAD_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace lorad::engine {

// fp32, bf16 or fp16; nullopt for any other dtype.
inline std::optional<kernels::FloatKind> FloatKindOf(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat:
      return kernels::FloatKind::kF32;
    case torch::kBFloat16:
      return kernels::FloatKind::kBF16;
    case torch::kHalf:
      return kernels::FloatKind::kF16;
    default:
      return std::nullopt;
  }
}

// Throws (TORCH_CHECK) when a kernel launcher returned an error string.
inline void CheckLaunch(const char* error, const char* what) {
  TORCH_CHECK(error == nullptr, what, ": CUDA error: ", error);
}

#if defined(LORAD_WITH_CUDA)
// The current CUDA stream of `device`, as the kernels take it (a cudaStream_t).
inline void* CurrentStream(const torch::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}
#endif

// Runs a kernel of kernels/ on the device of `on`: `cpu()` (the CPU reference) for a CPU tensor,
// else `cuda(stream)` on that device's current stream, whose error string becomes a c10::Error
// naming `what`.
template <typename Cpu, typename Cuda>
void RunKernel(const torch::Tensor& on, const char* what, Cpu cpu, Cuda cuda) {
  if (on.is_cpu()) {
    cpu();
    return;
  }
#if defined(LORAD_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(on.device());
  CheckLaunch(cuda(CurrentStream(on.device())), what);
#else
  (void)cuda;
  TORCH_CHECK(false, what, ": no CUDA kernels in this build for ", on.device().str());
#endif
}

}  // namespace lorad::engine
