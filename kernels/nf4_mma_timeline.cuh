// Diagnostics for nf4_mma.cu, compiled only with -DLORAD_NF4_MMA_TIMELINE (a variant build of
// tests/gpu/run_variants_on_device.sh; never in the engine): for each block of each launch, when
// it reached each phase of the kernel, for nf4_gemv_bench's timeline of batch-1 launches.
// Included by nf4_mma.cu only (the device arrays live in that translation unit).
#pragma once

#include <cuda_runtime.h>

#include "kernels/nf4_mma.h"

#if defined(LORAD_NF4_MMA_TIMELINE)
namespace lorad::kernels {

// Per (launch slot, block): Nf4MmaTimelinePoint values. A block's launch slot is the count of
// earlier launches that had a block with its index (mod kNf4TimelineLaunches).
__device__ unsigned long long g_nf4_timeline[kNf4TimelineLaunches][kNf4TimelineBlocks]
                                            [kNf4TimelinePoints];
__device__ unsigned int g_nf4_timeline_launches[kNf4TimelineBlocks];

// The block's row of g_nf4_timeline, chosen by thread 0 and shared through `row`.
__device__ __forceinline__ unsigned long long* TimelineRow(unsigned long long** row) {
  if (threadIdx.x == 0) {
    const unsigned slot = atomicAdd(&g_nf4_timeline_launches[blockIdx.x % kNf4TimelineBlocks], 1u);
    *row = g_nf4_timeline[slot % kNf4TimelineLaunches][blockIdx.x % kNf4TimelineBlocks];
  }
  __syncthreads();
  return *row;
}

__device__ __forceinline__ unsigned long long GlobalTimer() {
  unsigned long long ns;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(ns));
  return ns;
}

__device__ __forceinline__ unsigned SmId() {
  unsigned id;
  asm volatile("mov.u32 %0, %smid;" : "=r"(id));
  return id;
}

int nf4_mma_timeline_copy(unsigned long long* host) {
  if (cudaMemcpyFromSymbol(host, g_nf4_timeline, sizeof(g_nf4_timeline)) != cudaSuccess) return 1;
  static const unsigned zeros[kNf4TimelineBlocks] = {};
  static unsigned long long cleared[kNf4TimelineLaunches][kNf4TimelineBlocks][kNf4TimelinePoints];
  return cudaMemcpyToSymbol(g_nf4_timeline_launches, zeros, sizeof(zeros)) != cudaSuccess ||
         cudaMemcpyToSymbol(g_nf4_timeline, cleared, sizeof(cleared)) != cudaSuccess;
}

}  // namespace lorad::kernels

// Records `value` as point `point` of the block's row, from the calling thread.
#define LORAD_NF4_TIMELINE(point, value) (timeline_row[point] = (value))
#else
#define LORAD_NF4_TIMELINE(point, value) ((void)0)
#endif
