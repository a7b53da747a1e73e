// DeviceInfo: what the engine will run on, decided once at start-up.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace lorad::engine {

struct DeviceInfo {
  std::string device;  // "cuda:0" or "cpu"
  std::string name;    // e.g. "NVIDIA H100 80GB HBM3", or "cpu"
  std::string dtype;   // compute dtype: "bfloat16" on CUDA, "float32" on CPU
  std::string torch_version;
  int cuda_devices = 0;

  // Picks CUDA device 0 when one is visible and `prefer` is not "cpu"; otherwise the CPU.
  static DeviceInfo Detect(const std::string& prefer);
};

// INVALID_ARGUMENT naming model.device when `prefer` asks for CUDA ("cuda...") and none is visible.
absl::Status CheckDeviceAvailable(const std::string& prefer);

// Bytes of host memory a new allocation can still get: /proc/meminfo's MemAvailable, or less
// where the process's memory cgroup (a container's limit, a systemd unit's MemoryMax=; v1 or v2)
// leaves less, counting page cache it could drop as free. -1 when neither is readable.
int64_t AvailableHostBytes();
// Bytes of host memory in all: /proc/meminfo's MemTotal, or the memory cgroup's limit where it is
// lower. -1 when neither is readable.
int64_t TotalHostBytes();

// "4.6 MiB", "3.42 GiB": the unit that keeps a small size readable.
std::string ReadableBytes(int64_t bytes);

}  // namespace lorad::engine
