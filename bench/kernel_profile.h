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
    PrintIdle(*result, per);
  }

 private:
  struct Span {
    uint64_t start = 0;
    uint64_t end = 0;
    std::string name;
  };

  // Where the GPU idles between kernels: the gaps by size, and the largest ones with the kernels
  // around them and the host ops that were running then (innermost first), which say what the
  // device waited for (a synchronizing copy, an .item(), a run of small launches).
  static void PrintIdle(const torch::autograd::profiler::ProfilerResult& result, double per) {
    std::vector<Span> gpu, cpu;
    for (const auto& e : result.events()) {
      if (e.durationNs() == 0) continue;
      Span span{e.startNs(), e.endNs(), ShortName(e.name())};
      (e.deviceType() == c10::DeviceType::CUDA ? gpu : cpu).push_back(std::move(span));
    }
    if (gpu.size() < 2) return;
    std::sort(gpu.begin(), gpu.end(),
              [](const Span& a, const Span& b) { return a.start < b.start; });
    std::vector<std::pair<Span, std::string>> gaps;  // the gap (named by the kernel after it)
    uint64_t busy_end = gpu[0].end;
    std::string last = gpu[0].name;
    for (size_t i = 1; i < gpu.size(); ++i) {
      if (gpu[i].start > busy_end) gaps.push_back({{busy_end, gpu[i].start, gpu[i].name}, last});
      if (gpu[i].end > busy_end) {
        busy_end = gpu[i].end;
        last = gpu[i].name;
      }
    }
    constexpr double kBounds[] = {1e4, 1e5, 1e6, 1e18};  // ns: < 10 us, < 100 us, < 1 ms, more
    constexpr const char* kLabels[] = {"< 10 us", "10-100 us", "0.1-1 ms", ">= 1 ms"};
    double total[4] = {}, count[4] = {};
    for (const auto& [gap, before] : gaps) {
      const double ns = static_cast<double>(gap.end - gap.start);
      int b = 0;
      while (ns >= kBounds[b]) ++b;
      total[b] += ns;
      count[b] += 1;
    }
    std::printf("GPU idle between its first and last kernel, per step:");
    for (int b = 0; b < 4; ++b) {
      std::printf(" %s: %.0f gaps, %.2f ms;", kLabels[b], count[b] / per, total[b] / 1e6 / per);
    }
    std::printf("\n");
    std::sort(gaps.begin(), gaps.end(), [](const auto& a, const auto& b) {
      return a.first.end - a.first.start > b.first.end - b.first.start;
    });
    for (size_t i = 0; i < gaps.size() && i < 12; ++i) {
      const Span& gap = gaps[i].first;
      std::vector<const Span*> host;
      for (const Span& c : cpu) {
        if (c.start < gap.end && c.end > gap.start) host.push_back(&c);
      }
      std::sort(host.begin(), host.end(),
                [](const Span* a, const Span* b) { return a->end - a->start < b->end - b->start; });
      std::string ops;
      for (size_t j = 0; j < host.size() && j < 4; ++j) {
        ops += (j > 0 ? " < " : "") + host[j]->name.substr(0, 40);
      }
      std::printf(
          "  idle %8.1f us after %.60s\n                  before %.60s\n                  host: "
          "%s\n",
          static_cast<double>(gap.end - gap.start) / 1e3, gaps[i].second.c_str(), gap.name.c_str(),
          ops.c_str());
    }
  }

  // Kernel names carry their whole template argument list: keep the first 150 characters.
  static std::string ShortName(std::string name) {
    if (name.size() > 150) name = name.substr(0, 150) + "...";
    return name;
  }
};

}  // namespace lorad::bench
