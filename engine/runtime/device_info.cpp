#include "engine/runtime/device_info.h"

#include <torch/cuda.h>
#include <torch/version.h>

namespace lorad::engine {

DeviceInfo DeviceInfo::Detect(const std::string& prefer) {
  DeviceInfo info;
  info.torch_version = TORCH_VERSION;
  info.cuda_devices = static_cast<int>(torch::cuda::device_count());
  if (prefer != "cpu" && info.cuda_devices > 0) {
    info.device = "cuda:0";
    info.name = "cuda";
    info.dtype = "bfloat16";
  } else {
    info.device = "cpu";
    info.name = "cpu";
    info.dtype = "float32";
  }
  return info;
}

}  // namespace lorad::engine
