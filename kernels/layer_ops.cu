// CUDA implementation of kernels/layer_ops.h. Raw pointers only: no torch headers here.
//
// Every kernel is launched with programmatic dependent launch (kernels/programmatic_launch.cuh):
// it lets the next kernel start at once and waits for its predecessor before reading anything,
// so in a decode step's chain of small kernels each launch overlaps the tail of the one before.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/device_float.cuh"
#include "kernels/layer_ops.h"
#include "kernels/programmatic_launch.cuh"
#include "kernels/warp_reduce.cuh"

namespace lorad::kernels {
namespace {

constexpr int kNormThreads = 256;
constexpr int kThreads = 256;

__device__ __forceinline__ float Round(float v, float*) { return v; }
__device__ __forceinline__ float Round(float v, __nv_bfloat16*) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

// One block per row: a block-wide sum of squares, then the scaled, rounded, weighted row.
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    RmsNormKernel(const T* __restrict__ x, const T* __restrict__ weight, int64_t width, float eps,
                  T* __restrict__ out) {
  AllowDependents();
  WaitForPredecessor();
  __shared__ float warp_sums[kNormThreads / 32];
  const T* row = x + blockIdx.x * width;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < width; i += kNormThreads) {
    const float v = ToFloat(row[i]);
    sum = fmaf(v, v, sum);
  }
  sum = WarpSum(sum);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sum;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kNormThreads / 32; ++w) total += warp_sums[w];
  const float inv = 1.0f / sqrtf(total / static_cast<float>(width) + eps);
  T* dst = out + blockIdx.x * width;
  for (int64_t i = threadIdx.x; i < width; i += kNormThreads) {
    const float normed = Round(ToFloat(row[i]) * inv, dst);
    StoreAs(dst + i, __fmul_rn(ToFloat(weight[i]), normed));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    RotaryKernel(const T* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin,
                 int64_t rows, int64_t heads, int64_t head_dim, T* __restrict__ out) {
  AllowDependents();
  WaitForPredecessor();
  const int64_t n = rows * heads * head_dim;
  const int64_t half = head_dim / 2;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t d = i % head_dim;
    const int64_t r = i / (heads * head_dim);
    const float rot = d < half ? -ToFloat(x[i + half]) : ToFloat(x[i - half]);
    const float a = Round(__fmul_rn(ToFloat(x[i]), ToFloat(cos[r * head_dim + d])), out);
    const float b = Round(__fmul_rn(rot, ToFloat(sin[r * head_dim + d])), out);
    StoreAs(out + i, __fadd_rn(a, b));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    SiluMulKernel(const T* __restrict__ gate, const T* __restrict__ up, int64_t n,
                  T* __restrict__ out) {
  AllowDependents();
  WaitForPredecessor();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float g = ToFloat(gate[i]);
    const float silu = Round(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), out);
    StoreAs(out + i, __fmul_rn(silu, ToFloat(up[i])));
  }
}

// One block per row, as RmsNormKernel: two block-wide sums (of x^2 and of g * x), then the row.
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    RmsNormBackwardKernel(const T* __restrict__ x, const T* __restrict__ weight,
                          const T* __restrict__ dy, int64_t width, float eps, T* __restrict__ dx) {
  AllowDependents();
  WaitForPredecessor();
  __shared__ float warp_sums[2][kNormThreads / 32];
  const T* row = x + blockIdx.x * width;
  const T* grad = dy + blockIdx.x * width;
  T* dst = dx + blockIdx.x * width;
  float squares = 0.0f;
  float dot = 0.0f;
  for (int64_t i = threadIdx.x; i < width; i += kNormThreads) {
    const float v = ToFloat(row[i]);
    squares = fmaf(v, v, squares);
    dot = fmaf(Round(__fmul_rn(ToFloat(grad[i]), ToFloat(weight[i])), dst), v, dot);
  }
  squares = WarpSum(squares);
  dot = WarpSum(dot);
  if ((threadIdx.x & 31) == 0) {
    warp_sums[0][threadIdx.x >> 5] = squares;
    warp_sums[1][threadIdx.x >> 5] = dot;
  }
  __syncthreads();
  float total_squares = 0.0f;
  float total_dot = 0.0f;
#pragma unroll
  for (int w = 0; w < kNormThreads / 32; ++w) {
    total_squares += warp_sums[0][w];
    total_dot += warp_sums[1][w];
  }
  const float inv = 1.0f / sqrtf(total_squares / static_cast<float>(width) + eps);
  const float along_x = inv * inv * inv * total_dot / static_cast<float>(width);
  for (int64_t i = threadIdx.x; i < width; i += kNormThreads) {
    const float g = Round(__fmul_rn(ToFloat(grad[i]), ToFloat(weight[i])), dst);
    StoreAs(dst + i, g * inv - ToFloat(row[i]) * along_x);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    SiluMulBackwardKernel(const T* __restrict__ gate, const T* __restrict__ up,
                          const T* __restrict__ dy, int64_t n, T* __restrict__ d_gate,
                          T* __restrict__ d_up) {
  AllowDependents();
  WaitForPredecessor();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float g = ToFloat(gate[i]);
    const float grad = ToFloat(dy[i]);
    const float e = __fadd_rn(1.0f, expf(-g));
    const float s = __fdiv_rn(1.0f, e);
    StoreAs(d_up + i, __fmul_rn(grad, Round(__fdiv_rn(g, e), d_up)));
    const float d_silu = Round(__fmul_rn(grad, ToFloat(up[i])), d_gate);
    StoreAs(d_gate + i, d_silu * (s * (1.0f + g * (1.0f - s))));
  }
}

unsigned Blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

template <typename... Params, typename... Args>
const char* Launch(void (*kernel)(Params...), unsigned grid, int threads, cudaStream_t stream,
                   Args... args) {
  const cudaError_t err = LaunchMaybeOverlapped(kernel, dim3(grid), dim3(threads), 0, stream,
                                                /*overlapped=*/true, args...);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* rms_norm_cuda(const void* x, const void* weight, FloatKind kind, int64_t rows,
                          int64_t width, float eps, void* out, void* stream) {
  if (rows <= 0) return nullptr;
  if (rows > 0x7fffffff) return "rms_norm: too many rows";
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(rows);
  if (kind == FloatKind::kF32) {
    return Launch(RmsNormKernel<float>, grid, kNormThreads, s, static_cast<const float*>(x),
                  static_cast<const float*>(weight), width, eps, static_cast<float*>(out));
  } else if (kind == FloatKind::kBF16) {
    return Launch(RmsNormKernel<__nv_bfloat16>, grid, kNormThreads, s,
                  static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(weight),
                  width, eps, static_cast<__nv_bfloat16*>(out));
  } else {
    return "rms_norm: fp32 or bf16 only";
  }
}

const char* rotary_cuda(const void* x, const void* cos, const void* sin, FloatKind kind,
                        int64_t rows, int64_t heads, int64_t head_dim, void* out, void* stream) {
  if (head_dim % 2 != 0) return "rotary: head_dim must be even";
  const int64_t n = rows * heads * head_dim;
  if (n <= 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  if (kind == FloatKind::kF32) {
    return Launch(RotaryKernel<float>, Blocks(n), kThreads, s, static_cast<const float*>(x),
                  static_cast<const float*>(cos), static_cast<const float*>(sin), rows, heads,
                  head_dim, static_cast<float*>(out));
  } else if (kind == FloatKind::kBF16) {
    return Launch(RotaryKernel<__nv_bfloat16>, Blocks(n), kThreads, s,
                  static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(cos),
                  static_cast<const __nv_bfloat16*>(sin), rows, heads, head_dim,
                  static_cast<__nv_bfloat16*>(out));
  } else {
    return "rotary: fp32 or bf16 only";
  }
}

const char* silu_mul_cuda(const void* gate, const void* up, FloatKind kind, int64_t n, void* out,
                          void* stream) {
  if (n <= 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  if (kind == FloatKind::kF32) {
    return Launch(SiluMulKernel<float>, Blocks(n), kThreads, s, static_cast<const float*>(gate),
                  static_cast<const float*>(up), n, static_cast<float*>(out));
  } else if (kind == FloatKind::kBF16) {
    return Launch(SiluMulKernel<__nv_bfloat16>, Blocks(n), kThreads, s,
                  static_cast<const __nv_bfloat16*>(gate), static_cast<const __nv_bfloat16*>(up), n,
                  static_cast<__nv_bfloat16*>(out));
  } else {
    return "silu_mul: fp32 or bf16 only";
  }
}

const char* rms_norm_backward_cuda(const void* x, const void* weight, const void* dy,
                                   FloatKind kind, int64_t rows, int64_t width, float eps, void* dx,
                                   void* stream) {
  if (rows <= 0) return nullptr;
  if (rows > 0x7fffffff) return "rms_norm_backward: too many rows";
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(rows);
  if (kind == FloatKind::kF32) {
    return Launch(RmsNormBackwardKernel<float>, grid, kNormThreads, s, static_cast<const float*>(x),
                  static_cast<const float*>(weight), static_cast<const float*>(dy), width, eps,
                  static_cast<float*>(dx));
  } else if (kind == FloatKind::kBF16) {
    return Launch(RmsNormBackwardKernel<__nv_bfloat16>, grid, kNormThreads, s,
                  static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(weight),
                  static_cast<const __nv_bfloat16*>(dy), width, eps,
                  static_cast<__nv_bfloat16*>(dx));
  } else {
    return "rms_norm_backward: fp32 or bf16 only";
  }
}

const char* silu_mul_backward_cuda(const void* gate, const void* up, const void* dy, FloatKind kind,
                                   int64_t n, void* d_gate, void* d_up, void* stream) {
  if (n <= 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  if (kind == FloatKind::kF32) {
    return Launch(SiluMulBackwardKernel<float>, Blocks(n), kThreads, s,
                  static_cast<const float*>(gate), static_cast<const float*>(up),
                  static_cast<const float*>(dy), n, static_cast<float*>(d_gate),
                  static_cast<float*>(d_up));
  } else if (kind == FloatKind::kBF16) {
    return Launch(SiluMulBackwardKernel<__nv_bfloat16>, Blocks(n), kThreads, s,
                  static_cast<const __nv_bfloat16*>(gate), static_cast<const __nv_bfloat16*>(up),
                  static_cast<const __nv_bfloat16*>(dy), n, static_cast<__nv_bfloat16*>(d_gate),
                  static_cast<__nv_bfloat16*>(d_up));
  } else {
    return "silu_mul_backward: fp32 or bf16 only";
  }
}

}  // namespace lorad::kernels
