// Programmatic dependent launch (PDL, sm_90+) for the decode kernels that read constant weights:
// such a kernel may start while the kernel before it on the stream is still running, fetch its
// weights, and only then wait for its predecessor before reading activations. Shared by the
// decode kernels (nf4_gemv.cu, nf4_mma.cu, layer_ops.cu, paged_attention.cu, ...), with the
// SM count they plan their launches by.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

namespace lorad::kernels {

// Lets the next PDL-launched kernel on the stream start. Without the launch attribute (or before
// sm_90) a no-op.
__device__ __forceinline__ void AllowDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Waits until the predecessor grid has completed and its writes are visible. Without the launch
// attribute it returns at once: the predecessor completed before this grid started.
__device__ __forceinline__ void WaitForPredecessor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The current device's SM count (132, an H100/H200's, if the query fails). Asked of the driver
// once per device: the decode kernels plan every launch with it.
inline int SmCount() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return 132;
  }
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    if (const int sms = known[device].load(std::memory_order_relaxed); sms > 0) return sms;
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0) {
    cudaGetLastError();
    return 132;
  }
  if (cacheable) known[device].store(sms, std::memory_order_relaxed);
  return sms;
}

// Whether the code of `kernel` that runs on this device has thread-block clusters: built for
// sm_90 or later, which also says the device has them. Asks the driver: callers keep the answer.
template <typename... Params>
bool HasClusterCode(void (*kernel)(Params...)) {
  cudaFuncAttributes attributes{};
  const bool clustered = cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
                         attributes.binaryVersion >= 90 && attributes.ptxVersion >= 90;
  cudaGetLastError();
  return clustered;
}

// Launches kernel<<<grid, block, shared_bytes, stream>>>(args...) in clusters of `cluster`
// blocks (1 x 1 x 1: none; sm_90), with programmatic stream serialization when `overlapped`;
// where the device or driver refuses that, launches without it.
template <typename... Params, typename... Args>
cudaError_t LaunchInClusters(void (*kernel)(Params...), dim3 grid, dim3 block, dim3 cluster,
                             size_t shared_bytes, cudaStream_t stream, bool overlapped,
                             Args... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[2];
  int clustered = 0;
  if (cluster.x * cluster.y * cluster.z > 1) {
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = cluster.x;
    attribute[0].val.clusterDim.y = cluster.y;
    attribute[0].val.clusterDim.z = cluster.z;
    clustered = 1;
  }
  attribute[clustered].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[clustered].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = clustered + (overlapped ? 1 : 0);
  cudaError_t err = cudaLaunchKernelEx(&config, kernel, args...);
  if (err != cudaSuccess && overlapped) {
    cudaGetLastError();
    config.numAttrs = clustered;
    err = cudaLaunchKernelEx(&config, kernel, args...);
  }
  if (err == cudaSuccess) err = cudaGetLastError();
  return err;
}

// LaunchInClusters without clusters.
template <typename... Params, typename... Args>
cudaError_t LaunchMaybeOverlapped(void (*kernel)(Params...), dim3 grid, dim3 block,
                                  size_t shared_bytes, cudaStream_t stream, bool overlapped,
                                  Args... args) {
  return LaunchInClusters(kernel, grid, block, dim3(1, 1, 1), shared_bytes, stream, overlapped,
                          args...);
}

}  // namespace lorad::kernels
