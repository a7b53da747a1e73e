// CUDA implementation of kernels/nf4.h. Raw pointers only: no torch headers here.
#include <cuda_runtime.h>

#include "kernels/nf4.h"

namespace lorad::kernels {
namespace {

__constant__ float kNf4CodeDevice[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// One thread per packed byte: two output values.
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed,
                                      const float* __restrict__ absmax, int64_t n_bytes,
                                      float* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_bytes) return;
  const uint8_t byte = packed[i];
  const float scale = absmax[(2 * i) / kNf4BlockSize];
  out[2 * i] = kNf4CodeDevice[byte >> 4] * scale;
  out[2 * i + 1] = kNf4CodeDevice[byte & 0x0F] * scale;
}

}  // namespace

void nf4_dequantize_cuda(const uint8_t* packed, const float* absmax, int64_t n, float* out,
                         void* stream) {
  const int64_t n_bytes = n / 2;
  constexpr int kThreads = 256;
  const int64_t blocks = (n_bytes + kThreads - 1) / kThreads;
  if (blocks == 0) return;
  nf4_dequantize_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                          static_cast<cudaStream_t>(stream)>>>(packed, absmax, n_bytes, out);
}

}  // namespace lorad::kernels
