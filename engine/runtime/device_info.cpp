#include "engine/runtime/device_info.h"

#include <torch/cuda.h>
#include <torch/version.h>

#include <algorithm>
#include <fstream>
#include <sstream>

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

absl::Status CheckDeviceAvailable(const std::string& prefer) {
  if (prefer.rfind("cuda", 0) == 0 && torch::cuda::device_count() == 0) {
    return absl::InvalidArgumentError(
        "model.device: '" + prefer +
        "' was asked for but no CUDA device is visible (check the NVIDIA runtime and "
        "CUDA_VISIBLE_DEVICES, or use 'auto' or 'cpu')");
  }
  return absl::OkStatus();
}

namespace {

// The first number in `path`'s text, or -1 ("max", absent, unreadable).
int64_t ReadNumber(const std::string& path) {
  std::ifstream in(path);
  int64_t value = -1;
  if (!(in >> value)) return -1;
  return value;
}

}  // namespace

int64_t AvailableHostBytes() {
  int64_t available = -1;
  std::ifstream meminfo("/proc/meminfo");
  std::string line;
  while (std::getline(meminfo, line)) {
    if (line.rfind("MemAvailable:", 0) == 0) {
      std::istringstream fields(line.substr(13));
      int64_t kib = 0;
      if (fields >> kib) available = kib * 1024;
      break;
    }
  }
  // cgroup v2 (Docker, Kubernetes, systemd): the limit less what the group already uses.
  const int64_t limit = ReadNumber("/sys/fs/cgroup/memory.max");
  const int64_t used = ReadNumber("/sys/fs/cgroup/memory.current");
  if (limit > 0 && used >= 0) {
    const int64_t left = std::max<int64_t>(0, limit - used);
    available = available < 0 ? left : std::min(available, left);
  }
  return available;
}

}  // namespace lorad::engine
