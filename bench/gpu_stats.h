// GpuStats: what the engine benchmarks read from the device: its name, a synchronize for host
// timers, and the caching allocator's peak, which is what torch.cuda.max_memory_allocated()
// reports on the Python side, so the two columns of a result compare like with like.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/torch.h>

#include <cstdint>
#include <string>

namespace lorad::bench {

class GpuStats {
 public:
  static bool Available() { return torch::cuda::is_available(); }

  static std::string DeviceName() {
    if (!Available()) return "cpu (no CUDA device)";
    return at::cuda::getDeviceProperties(0)->name;
  }

  static void Synchronize() {
    if (Available()) torch::cuda::synchronize();
  }

  // Starts a new peak at the current allocation (the base weights stay counted).
  static void ResetPeak() {
    if (Available()) c10::cuda::CUDACachingAllocator::resetPeakStats(0);
  }

  static int64_t PeakAllocatedBytes() {
    if (!Available()) return 0;
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
        .peak;
  }

  static int64_t PeakReservedBytes() {
    if (!Available()) return 0;
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
    return stats.reserved_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
        .peak;
  }
};

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

}  // namespace lorad::bench
