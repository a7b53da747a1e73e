// Timing for the benchmarks: CUDA events around `reps` back-to-back launches, captured into a CUDA
// graph where the work allows it (fewer launch gaps), after a warm-up; the median of `samples`.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

namespace lorad::bench {

inline void Check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "CUDA error %s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

// launch(i) enqueues the i-th run on `stream` (i picks the rotating input copy). Returns the
// median time of one run in microseconds; *graphed says whether a graph was used.
inline double MedianMicros(cudaStream_t stream, const std::function<void(int)>& launch, int reps,
                           int samples, bool* graphed) {
  for (int i = 0; i < 3 * reps; ++i) launch(i);  // warm-up: module load, handles, clocks
  Check(cudaStreamSynchronize(stream), "warm-up");
  cudaGraphExec_t exec = nullptr;
  cudaGraph_t graph = nullptr;
  if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
    for (int i = 0; i < reps; ++i) launch(i);
    if (cudaStreamEndCapture(stream, &graph) == cudaSuccess &&
        cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess) {
      *graphed = true;
    } else {
      exec = nullptr;
      *graphed = false;
    }
  }
  cudaGetLastError();  // a failed capture leaves an error behind; the plain path follows
  cudaEvent_t start, stop;
  Check(cudaEventCreate(&start), "event");
  Check(cudaEventCreate(&stop), "event");
  std::vector<double> times;
  for (int s = 0; s < samples; ++s) {
    Check(cudaEventRecord(start, stream), "record");
    if (exec) {
      Check(cudaGraphLaunch(exec, stream), "graph launch");
    } else {
      for (int i = 0; i < reps; ++i) launch(i);
    }
    Check(cudaEventRecord(stop, stream), "record");
    Check(cudaEventSynchronize(stop), "sync");
    float ms = 0.f;
    Check(cudaEventElapsedTime(&ms, start, stop), "elapsed");
    times.push_back(1000.0 * ms / reps);
  }
  Check(cudaGetLastError(), "timed launches");
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace lorad::bench
