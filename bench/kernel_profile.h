// KernelProfile: where the GPU time of a stretch of host code goes, kernel by kernel, through
// libtorch's Kineto profiler (CUPTI), for the benchmarks' --profile_steps diagnosis. Prints each
// kernel's count, time per profiled step and share of the GPU time, largest first, and the GPU
// time against the wall time (the difference is the GPU idling on the host). A diagnosis, not a
// benchmark: the profiler adds some host overhead per launch, so read the shares.
#pragma once

#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace lorad::bench {

class KernelProfile {
 public:
  static void Start() {
    namespace impl = torch::profiler::impl;
    const impl::ProfilerConfig config(impl::ProfilerState::KINETO);
    const std::set<impl::ActivityType> activities = {impl::ActivityType::CPU,
                                                     impl::ActivityType::CUDA};
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
  }

  // Stops the profiler and prints the summary of `steps` steps that took `wall_ms` in all.
  static void StopAndPrint(int64_t steps, double wall_ms, size_t top = 45) {
    const auto result = torch::autograd::profiler::disableProfiler();
    std::map<std::string, std::pair<int64_t, double>> by_name;  // count, total ns
    double gpu_ns = 0;
    for (const auto& e : result->events()) {
      if (e.deviceType() != c10::DeviceType::CUDA) continue;
      auto& [count, ns] = by_name[ShortName(e.name())];
      ++count;
      ns += static_cast<double>(e.durationNs());
      gpu_ns += static_cast<double>(e.durationNs());
    }
    std::vector<std::pair<std::string, std::pair<int64_t, double>>> rows(by_name.begin(),
                                                                         by_name.end());
    std::sort(rows.begin(), rows.end(),
              [](const auto& a, const auto& b) { return a.second.second > b.second.second; });
    const double per = steps > 0 ? static_cast<double>(steps) : 1.0;
    std::printf("profile of %lld steps: GPU busy %.1f ms per step of %.1f ms wall (%.0f%%)\n",
                static_cast<long long>(steps), gpu_ns / 1e6 / per, wall_ms / per,
                wall_ms > 0 ? 100.0 * gpu_ns / 1e6 / wall_ms : 0.0);
    std::printf("%8s %10s %6s  %s\n", "count", "ms/step", "share", "kernel");
    for (size_t i = 0; i < rows.size() && i < top; ++i) {
      const auto& [name, stat] = rows[i];
      std::printf("%8lld %10.2f %5.1f%%  %s\n", static_cast<long long>(stat.first / per),
                  stat.second / 1e6 / per, 100.0 * stat.second / gpu_ns, name.c_str());
    }
  }

 private:
  // Kernel names carry their whole template argument list: keep the first 150 characters.
  static std::string ShortName(std::string name) {
    if (name.size() > 150) name = name.substr(0, 150) + "...";
    return name;
  }
};

}  // namespace lorad::bench
