// nf4_gemv_bench's timeline of batch-1 nf4_mma launches (a diagnostic build only:
// -DLORAD_NF4_MMA_TIMELINE, see kernels/nf4_mma_timeline.cuh): where a block's time goes between
// its start and its end, and how long an SM sits between one launch's block and the next's.
#pragma once

#if defined(LORAD_NF4_MMA_TIMELINE)
#include <algorithm>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "kernels/nf4_mma.h"

namespace lorad::bench {

inline double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// launch(c): one batch-1 product with programmatic launch on copy c. Runs kNf4TimelineLaunches of
// them back to back; returns a row of the medians over blocks (then over launches 1..) of each
// phase, ns, for PrintMmaTimeline.
inline std::string MmaTimelineRow(const char* name, const std::function<void(int)>& launch,
                                  cudaStream_t stream) {
  using namespace kernels;
  constexpr int L = kNf4TimelineLaunches, B = kNf4TimelineBlocks, P = kNf4TimelinePoints;
  std::vector<unsigned long long> t(static_cast<size_t>(L) * B * P);
  cudaStreamSynchronize(stream);
  if (nf4_mma_timeline_copy(t.data()) != 0) return "timeline: copy failed\n";  // and clears
  for (int c = 0; c < L; ++c) launch(c);
  cudaStreamSynchronize(stream);
  if (nf4_mma_timeline_copy(t.data()) != 0) return "timeline: copy failed\n";
  const auto at = [&](int l, int b, int p) { return t[(static_cast<size_t>(l) * B + b) * P + p]; };
  // Columns: handoff (the SM's previous block's end to this block's start), then phases.
  constexpr int C = 14;  // the columns of PrintMmaTimeline
  std::vector<double> per_launch[C];
  for (int l = 1; l < L; ++l) {
    std::map<unsigned long long, unsigned long long> prev_end_on_sm;
    for (int b = 0; b < B; ++b) {
      if (at(l - 1, b, kTimelineEndNs) != 0) {
        prev_end_on_sm[at(l - 1, b, kTimelineSm)] =
            std::max(prev_end_on_sm[at(l - 1, b, kTimelineSm)], at(l - 1, b, kTimelineEndNs));
      }
    }
    std::vector<double> col[C];
    unsigned long long first = ~0ull, last = 0;
    for (int b = 0; b < B; ++b) {
      if (at(l, b, kTimelineEndNs) == 0) continue;
      const double ns = double(at(l, b, kTimelineEndNs) - at(l, b, kTimelineStartNs));
      const double cycles = double(at(l, b, kTimelineEnd) - at(l, b, kTimelineStart));
      const double per_cycle = cycles > 0 ? ns / cycles : 0;
      const auto span = [&](int from, int to) {
        return per_cycle * double(static_cast<long long>(at(l, b, to) - at(l, b, from)));
      };
      unsigned long long done_min = ~0ull, done_max = 0;
      for (int w = 0; kTimelineWarpDone + w < P && at(l, b, kTimelineWarpDone + w) != 0; ++w) {
        done_min = std::min(done_min, at(l, b, kTimelineWarpDone + w));
        done_max = std::max(done_max, at(l, b, kTimelineWarpDone + w));
      }
      const auto prev = prev_end_on_sm.find(at(l, b, kTimelineSm));
      if (prev != prev_end_on_sm.end()) {
        col[0].push_back(double(static_cast<long long>(at(l, b, kTimelineStartNs) - prev->second)));
      }
      const auto since_sync = [&](unsigned long long clock) {
        return per_cycle * double(static_cast<long long>(clock - at(l, b, kTimelineSynced)));
      };
      col[1].push_back(span(kTimelineStart, kTimelineRanged));
      col[2].push_back(span(kTimelineRanged, kTimelinePointed));
      col[3].push_back(span(kTimelinePointed, kTimelineIssued));
      col[4].push_back(span(kTimelineIssued, kTimelineTableBuilt));
      col[5].push_back(span(kTimelineTableBuilt, kTimelineWaited));
      col[6].push_back(span(kTimelineWaited, kTimelineSynced));
      col[7].push_back(span(kTimelineSynced, kTimelineFirstStage));
      col[8].push_back(since_sync(done_min));
      col[9].push_back(since_sync(done_max));
      col[10].push_back(per_cycle *
                        double(static_cast<long long>(at(l, b, kTimelineReduce) - done_max)));
      col[11].push_back(span(kTimelineReduce, kTimelineEnd));
      col[12].push_back(ns);
      first = std::min(first, at(l, b, kTimelineStartNs));
      last = std::max(last, at(l, b, kTimelineEndNs));
    }
    for (int c = 0; c < C - 1; ++c) per_launch[c].push_back(Median(col[c]));
    per_launch[C - 1].push_back(double(last - first));
  }
  char cell[32];
  std::snprintf(cell, sizeof(cell), "%-14s |", name);
  std::string row = cell;
  for (int c = 0; c < C; ++c) {
    std::snprintf(cell, sizeof(cell), " %9.0f", Median(per_launch[c]));
    row += cell;
  }
  return row + "\n";
}

inline void PrintMmaTimeline(const std::vector<std::string>& rows) {
  std::printf(
      "\ntimeline of batch-1 launches with programmatic launch, ns (medians over blocks, then\n"
      "over launches). handoff: the SM's block of the launch before ended -> this block started;\n"
      "range, point, issue: the block's range and warp shares, the first segment's addresses, its\n"
      "first copies; table: pair table and code2 built (and, since 2026-12-03, the first copies\n"
      "landed); wait: for the kernel before; sync: the block's barrier; 1st stage: its copies\n"
      "landed; warps min/max: the first and last warp done, from the barrier; reduce: that to the\n"
      "barrier after it; store: the sums written; block: start to end; launch: first block start\n"
      "to last block end.\n");
  std::printf("%-14s | %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s\n", "layer",
              "handoff", "range", "point", "issue", "table", "wait", "sync", "1st stage",
              "warps min", "warps max", "reduce", "store", "block", "launch");
  for (const std::string& row : rows) std::printf("%s", row.c_str());
}

}  // namespace lorad::bench
#endif  // LORAD_NF4_MMA_TIMELINE
