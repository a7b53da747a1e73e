#include "engine/runtime/device_info.h"

#include <torch/cuda.h>
#include <torch/version.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <vector>

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

// The value of `key` in a "key value" file (/proc/meminfo's kB lines, a cgroup's memory.stat),
// or -1.
int64_t ReadKeyed(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) != 0 || line.size() <= key.size() || !std::isspace(line[key.size()])) {
      continue;
    }
    std::istringstream fields(line.substr(key.size()));
    int64_t value = -1;
    return fields >> value ? value : -1;
  }
  return -1;
}

// What this process's memory cgroup allows: its limit (`left` false) or that limit less what it
// uses, counting the page cache it could drop (inactive files: the model's files read at load) as
// free (`left` true). -1 without a limit. cgroup v2 (one hierarchy) or v1 (the memory
// controller's), at the group /proc/self/cgroup names (a systemd unit's MemoryMax=), else at the
// mount's root (a container).
int64_t CgroupBytes(bool left) {
  std::ifstream self("/proc/self/cgroup");
  std::string line, v2_path, v1_path;
  while (std::getline(self, line)) {
    if (line.rfind("0::", 0) == 0) v2_path = line.substr(3);
    const auto memory = line.find(":memory:");
    if (memory != std::string::npos) v1_path = line.substr(memory + 8);
  }
  struct Files {
    std::string limit, usage, stat, inactive_key;
  };
  std::vector<Files> candidates;
  for (const std::string& dir : {"/sys/fs/cgroup" + v2_path, std::string("/sys/fs/cgroup")}) {
    candidates.push_back(
        {dir + "/memory.max", dir + "/memory.current", dir + "/memory.stat", "inactive_file"});
  }
  for (const std::string& dir :
       {"/sys/fs/cgroup/memory" + v1_path, std::string("/sys/fs/cgroup/memory")}) {
    candidates.push_back({dir + "/memory.limit_in_bytes", dir + "/memory.usage_in_bytes",
                          dir + "/memory.stat", "total_inactive_file"});
  }
  for (const Files& f : candidates) {
    const int64_t limit = ReadNumber(f.limit);
    const int64_t usage = ReadNumber(f.usage);
    // v1 says "no limit" with a huge number (PAGE_COUNTER_MAX pages).
    if (limit <= 0 || usage < 0 || limit >= (int64_t{1} << 60)) continue;
    if (!left) return limit;
    const int64_t reclaimable = std::max<int64_t>(0, ReadKeyed(f.stat, f.inactive_key));
    return std::max<int64_t>(0, limit - usage + reclaimable);
  }
  return -1;
}

// /proc/meminfo's `key` line in bytes, or the memory cgroup's figure where it is lower.
int64_t HostBytes(const char* key, bool cgroup_left) {
  const int64_t kib = ReadKeyed("/proc/meminfo", key);
  int64_t bytes = kib >= 0 ? kib * 1024 : -1;
  const int64_t cgroup = CgroupBytes(cgroup_left);
  if (cgroup >= 0) bytes = bytes < 0 ? cgroup : std::min(bytes, cgroup);
  return bytes;
}

}  // namespace

int64_t AvailableHostBytes() { return HostBytes("MemAvailable:", /*cgroup_left=*/true); }

int64_t TotalHostBytes() { return HostBytes("MemTotal:", /*cgroup_left=*/false); }

std::string ReadableBytes(int64_t bytes) {
  char text[32];
  if (bytes < (int64_t{1} << 30)) {
    std::snprintf(text, sizeof text, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  } else {
    std::snprintf(text, sizeof text, "%.2f GiB", static_cast<double>(bytes) / (1 << 30));
  }
  return text;
}

}  // namespace lorad::engine
