// DeviceInfo: what the engine will run on, decided once at start-up.
#pragma once

#include <string>

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

}  // namespace lorad::engine
