// GpuBuffer: a device array freed at scope exit, for the GPU tests and benchmarks. New buffers are
// poisoned (every byte 0xFF: NaN for floats) so a test notices an element the kernel never wrote.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace lorad::kernels::gpu_test {

// Aborts on a CUDA error: a failed allocation or copy leaves nothing worth testing.
inline void CudaCheck(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "CUDA error %s: %s\n", what, cudaGetErrorString(err));
    std::abort();
  }
}

template <typename T>
class GpuBuffer {
 public:
  explicit GpuBuffer(size_t n) : n_(n) {
    CudaCheck(cudaMalloc(&ptr_, (n ? n : 1) * sizeof(T)), "cudaMalloc");
    CudaCheck(cudaMemset(ptr_, 0xFF, (n ? n : 1) * sizeof(T)), "cudaMemset");
  }
  explicit GpuBuffer(const std::vector<T>& host) : GpuBuffer(host.size()) { Write(host); }
  GpuBuffer(const GpuBuffer&) = delete;
  GpuBuffer& operator=(const GpuBuffer&) = delete;
  ~GpuBuffer() { cudaFree(ptr_); }

  T* get() const { return ptr_; }
  size_t size() const { return n_; }

  void Write(const std::vector<T>& host) {
    if (host.size() != n_) std::abort();
    if (n_) CudaCheck(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), "H2D");
  }
  std::vector<T> Read() const {
    std::vector<T> host(n_);
    if (n_) CudaCheck(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "D2H");
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

}  // namespace lorad::kernels::gpu_test

// A launcher's result (nullptr or an error string), then the kernel's own completion.
#define LORAD_ASSERT_LAUNCH(expr)                                      \
  do {                                                                 \
    const char* lorad_err_ = (expr);                                   \
    ASSERT_TRUE(lorad_err_ == nullptr) << #expr << ": " << lorad_err_; \
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << #expr;          \
  } while (0)
