// CUDA implementation of kernels/layer_ops.h. Raw pointers only: no torch headers here.
//
// Every kernel is launched with programmatic dependent launch (kernels/programmatic_launch.cuh):
// it lets the next kernel start at once and waits for its predecessor before reading anything,
// so in a decode step's chain of small kernels each launch overlaps the tail of the one before.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kernels/device_float.cuh"
#include "kernels/layer_ops.h"
#include "kernels/programmatic_launch.cuh"
#include "kernels/rotary_math.cuh"
#include "kernels/warp_reduce.cuh"

namespace lorad::kernels {
namespace {

constexpr int kNormThreads = 256;
constexpr int kThreads = 256;

// 1 / sqrt(mean of squares + eps) of a row whose squares the block's threads summed in part
// (`sum`, this thread's), the parts added up in warp order. Every thread of the block calls it.
__device__ __forceinline__ float InverseRms(float sum, int64_t width, float eps) {
  __shared__ float warp_sums[kNormThreads / 32];
  sum = WarpSum(sum);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sum;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kNormThreads / 32; ++w) total += warp_sums[w];
  return 1.0f / sqrtf(total / static_cast<float>(width) + eps);
}

// One block per row: a block-wide sum of squares, then the scaled, rounded, weighted row. With
// kAdd, the row is first x + delta, rounded and stored to `sum`; each thread reads back only
// what it stored, so the second pass needs no further barrier.
template <typename T, bool kAdd>
__global__ void __launch_bounds__(kNormThreads)
    RmsNormKernel(const T* __restrict__ x, const T* __restrict__ delta,
                  const T* __restrict__ weight, int64_t width, float eps, T* __restrict__ sum_out,
                  T* __restrict__ out) {
  AllowDependents();
  WaitForPredecessor();
  const int64_t first = blockIdx.x * width;
  const T* row = kAdd ? sum_out + first : x + first;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < width; i += kNormThreads) {
    float v;
    if constexpr (kAdd) {
      v = Round(__fadd_rn(ToFloat(x[first + i]), ToFloat(delta[first + i])), sum_out);
      StoreAs(sum_out + first + i, v);
    } else {
      v = ToFloat(row[i]);
    }
    sum = fmaf(v, v, sum);
  }
  const float inv = InverseRms(sum, width, eps);
  T* dst = out + first;
  for (int64_t i = threadIdx.x; i < width; i += kNormThreads) {
    const float normed = Round(ToFloat(row[i]) * inv, dst);
    StoreAs(dst + i, __fmul_rn(ToFloat(weight[i]), normed));
  }
}

// RmsNormKernel for rows that fit in registers (the decode case: one row of 4096 at batch 1):
// every thread loads its kChunks 16-byte pieces of the row (and of delta) at once, so the block
// waits for memory once instead of once per loop step, and keeps them for the second pass. The
// weight is constant, so its pieces are fetched before waiting for the predecessor. Same
// roundings as RmsNormKernel; only the order of the sum of squares differs.
constexpr int kNormChunks = 4;  // pieces per thread: rows up to 8192 bf16 or 4096 fp32 elements

template <typename T, bool kAdd>
__global__ void __launch_bounds__(kNormThreads)
    RmsNormInRegistersKernel(const T* __restrict__ x, const T* __restrict__ delta,
                             const T* __restrict__ weight, int64_t width, float eps,
                             T* __restrict__ sum_out, T* __restrict__ out) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte piece
  const int pieces = static_cast<int>(width / kPer);
  uint4 w[kNormChunks];  // kept packed until the end: fewer registers
#pragma unroll
  for (int c = 0; c < kNormChunks; ++c) {
    const int piece = threadIdx.x + c * kNormThreads;
    if (piece < pieces) w[c] = *reinterpret_cast<const uint4*>(weight + piece * kPer);
  }
  AllowDependents();
  WaitForPredecessor();
  const int64_t first = blockIdx.x * width;
  float v[kNormChunks][kPer];
#pragma unroll
  for (int c = 0; c < kNormChunks; ++c) {
    const int piece = threadIdx.x + c * kNormThreads;
    if (piece < pieces) {
      LoadFloats<kPer>(x + first + piece * kPer, v[c]);
      if constexpr (kAdd) {
        float d[kPer];
        LoadFloats<kPer>(delta + first + piece * kPer, d);
#pragma unroll
        for (int e = 0; e < kPer; ++e) v[c][e] = Round(__fadd_rn(v[c][e], d[e]), sum_out);
      }
    }
  }
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < kNormChunks; ++c) {
    const int piece = threadIdx.x + c * kNormThreads;
    if (piece < pieces) {
      if constexpr (kAdd) StoreFloats<kPer>(sum_out + first + piece * kPer, v[c]);
#pragma unroll
      for (int e = 0; e < kPer; ++e) sum = fmaf(v[c][e], v[c][e], sum);
    }
  }
  const float inv = InverseRms(sum, width, eps);
#pragma unroll
  for (int c = 0; c < kNormChunks; ++c) {
    const int piece = threadIdx.x + c * kNormThreads;
    if (piece < pieces) {
      float y[kPer];
      LoadFloats<kPer>(reinterpret_cast<const T*>(&w[c]), y);
#pragma unroll
      for (int e = 0; e < kPer; ++e) y[e] = __fmul_rn(y[e], Round(v[c][e] * inv, out));
      StoreFloats<kPer>(out + first + piece * kPer, y);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    RotaryKernel(const T* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin,
                 int64_t rows, int64_t heads, int64_t head_dim, T* __restrict__ out) {
  AllowDependents();
  WaitForPredecessor();
  const int64_t n = rows * heads * head_dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t d = i % head_dim;
    const int64_t r = i / (heads * head_dim);
    StoreAs(out + i,
            RotatedAt(x + (i - d), cos + r * head_dim, sin + r * head_dim, d, head_dim, out));
  }
}

// rotary_store: one thread per element of q, then of k, then of v (a decode step's few rows).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    RotaryStoreKernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const T* __restrict__ cos, const T* __restrict__ sin,
                      const int64_t* __restrict__ slots, T* __restrict__ q_out,
                      T* __restrict__ k_pool, T* __restrict__ v_pool, int64_t rows, int64_t heads,
                      int64_t kv_heads, int64_t head_dim) {
  AllowDependents();
  WaitForPredecessor();
  const int64_t q_row = heads * head_dim, kv_row = kv_heads * head_dim;
  const int64_t nq = rows * q_row, nkv = rows * kv_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < nq + 2 * nkv;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    if (i < nq) {
      const int64_t d = i % head_dim, r = i / q_row;
      StoreAs(q_out + i,
              RotatedAt(q + (i - d), cos + r * head_dim, sin + r * head_dim, d, head_dim, q_out));
      continue;
    }
    const int64_t j = i < nq + nkv ? i - nq : i - nq - nkv;
    const int64_t r = j / kv_row, in_row = j - r * kv_row;
    const int64_t to = slots[r] * kv_row + in_row;
    if (i < nq + nkv) {
      const int64_t d = in_row % head_dim;
      StoreAs(k_pool + to,
              RotatedAt(k + (j - d), cos + r * head_dim, sin + r * head_dim, d, head_dim, k_pool));
    } else {
      v_pool[to] = v[j];
    }
  }
}

// The same per element, for training's large tensors: a thread takes 8 consecutive d of one
// row and head's first half and their 8 partners d + half, in 16-byte loads and stores (fp32:
// two each). Needs half % 8 == 0 and 16-byte aligned tensors.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    RotaryPairsKernel(const T* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin,
                      int64_t rows, int64_t heads, int64_t head_dim, T* __restrict__ out) {
  AllowDependents();
  WaitForPredecessor();
  const int64_t half = head_dim / 2;
  const int64_t per_head = half / 8;
  const int64_t n = rows * heads * per_head;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row_head = t / per_head;
    const int64_t d = (t - row_head * per_head) * 8;
    const int64_t r = row_head / heads;
    const int64_t lo = row_head * head_dim + d;
    const int64_t angle = r * head_dim + d;
    float x_lo[8], x_hi[8], c_lo[8], c_hi[8], s_lo[8], s_hi[8], o_lo[8], o_hi[8];
    LoadFloats<8>(x + lo, x_lo), LoadFloats<8>(x + lo + half, x_hi);
    LoadFloats<8>(cos + angle, c_lo), LoadFloats<8>(cos + angle + half, c_hi);
    LoadFloats<8>(sin + angle, s_lo), LoadFloats<8>(sin + angle + half, s_hi);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      o_lo[k] = __fadd_rn(Round(__fmul_rn(x_lo[k], c_lo[k]), out),
                          Round(__fmul_rn(-x_hi[k], s_lo[k]), out));
      o_hi[k] = __fadd_rn(Round(__fmul_rn(x_hi[k], c_hi[k]), out),
                          Round(__fmul_rn(x_lo[k], s_hi[k]), out));
    }
    StoreFloats<8>(out + lo, o_lo), StoreFloats<8>(out + lo + half, o_hi);
  }
}

// Elementwise kernels walk kVec consecutive elements per thread and step (16-byte loads and
// stores when kVec is 8; tensors then 16-byte aligned), then the first block does the last
// n % kVec one by one.
template <int kVec, typename Body>
__device__ __forceinline__ void ForEachGroup(int64_t n, Body body) {
  const int64_t groups = n / kVec;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    body.template Group<kVec>(g * kVec);
  }
  if (blockIdx.x != 0) return;
  for (int64_t i = groups * kVec + threadIdx.x; i < n; i += kThreads) body.template Group<1>(i);
}

template <typename T>
struct SiluMulBody {
  const T* __restrict__ gate;
  const T* __restrict__ up;
  T* __restrict__ out;

  template <int N>
  __device__ __forceinline__ void Group(int64_t i) const {
    float g[N], u[N], o[N];
    LoadFloats<N>(gate + i, g), LoadFloats<N>(up + i, u);
#pragma unroll
    for (int k = 0; k < N; ++k) o[k] = SiluTimes<T>(g[k], u[k]);
    StoreFloats<N>(out + i, o);
  }
};

template <typename T>
struct SiluMulBackwardBody {
  const T* __restrict__ gate;
  const T* __restrict__ up;
  const T* __restrict__ dy;
  T* __restrict__ d_gate;
  T* __restrict__ d_up;

  template <int N>
  __device__ __forceinline__ void Group(int64_t i) const {
    float g[N], u[N], grad[N], dg[N], du[N];
    LoadFloats<N>(gate + i, g), LoadFloats<N>(up + i, u), LoadFloats<N>(dy + i, grad);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float e = __fadd_rn(1.0f, expf(-g[k]));
      const float s = __fdiv_rn(1.0f, e);
      du[k] = __fmul_rn(grad[k], Round(__fdiv_rn(g[k], e), d_up));
      const float d_silu = Round(__fmul_rn(grad[k], u[k]), d_gate);
      dg[k] = d_silu * (s * (1.0f + g[k] * (1.0f - s)));
    }
    StoreFloats<N>(d_gate + i, dg), StoreFloats<N>(d_up + i, du);
  }
};

template <int kVec, typename Body>
__global__ void __launch_bounds__(kThreads) ElementwiseKernel(int64_t n, Body body) {
  AllowDependents();
  WaitForPredecessor();
  ForEachGroup<kVec>(n, body);
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

bool Aligned16(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// An elementwise Body over n elements: 8 per thread and step when `vec`, else one.
template <typename Body>
const char* LaunchElementwise(bool vec, int64_t n, cudaStream_t stream, Body body) {
  return vec ? Launch(ElementwiseKernel<8, Body>, Blocks(n / 8), kThreads, stream, n, body)
             : Launch(ElementwiseKernel<1, Body>, Blocks(n), kThreads, stream, n, body);
}

// rms_norm_cuda and add_rms_norm_cuda: delta and sum nullptr for the plain norm.
const char* LaunchRmsNorm(const void* x, const void* delta, const void* weight, FloatKind kind,
                          int64_t rows, int64_t width, float eps, void* sum, void* out,
                          cudaStream_t stream) {
  if (rows <= 0) return nullptr;
  if (rows > 0x7fffffff) return "rms_norm: too many rows";
  const unsigned grid = static_cast<unsigned>(rows);
  const auto launch = [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    const auto* xt = static_cast<const T*>(x);
    const auto* dt = static_cast<const T*>(delta);
    const auto* wt = static_cast<const T*>(weight);
    auto* st = static_cast<T*>(sum);
    auto* ot = static_cast<T*>(out);
    constexpr int64_t kPer = 16 / sizeof(T);
    if (width % kPer == 0 && width <= kNormChunks * kNormThreads * kPer &&
        Aligned16({x, delta, weight, sum, out})) {
      return delta != nullptr ? Launch(RmsNormInRegistersKernel<T, true>, grid, kNormThreads,
                                       stream, xt, dt, wt, width, eps, st, ot)
                              : Launch(RmsNormInRegistersKernel<T, false>, grid, kNormThreads,
                                       stream, xt, dt, wt, width, eps, st, ot);
    }
    return delta != nullptr ? Launch(RmsNormKernel<T, true>, grid, kNormThreads, stream, xt, dt, wt,
                                     width, eps, st, ot)
                            : Launch(RmsNormKernel<T, false>, grid, kNormThreads, stream, xt, dt,
                                     wt, width, eps, st, ot);
  };
  if (kind == FloatKind::kF32) return launch(static_cast<float*>(nullptr));
  if (kind == FloatKind::kBF16) return launch(static_cast<__nv_bfloat16*>(nullptr));
  return "rms_norm: fp32 or bf16 only";
}

}  // namespace

const char* rms_norm_cuda(const void* x, const void* weight, FloatKind kind, int64_t rows,
                          int64_t width, float eps, void* out, void* stream) {
  return LaunchRmsNorm(x, nullptr, weight, kind, rows, width, eps, nullptr, out,
                       static_cast<cudaStream_t>(stream));
}

const char* add_rms_norm_cuda(const void* x, const void* delta, const void* weight, FloatKind kind,
                              int64_t rows, int64_t width, float eps, void* sum, void* out,
                              void* stream) {
  if (delta == nullptr || sum == nullptr) return "add_rms_norm: delta and sum are required";
  return LaunchRmsNorm(x, delta, weight, kind, rows, width, eps, sum, out,
                       static_cast<cudaStream_t>(stream));
}

const char* rotary_cuda(const void* x, const void* cos, const void* sin, FloatKind kind,
                        int64_t rows, int64_t heads, int64_t head_dim, void* out, void* stream) {
  if (head_dim % 2 != 0) return "rotary: head_dim must be even";
  const int64_t n = rows * heads * head_dim;
  if (n <= 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  const bool pairs = (head_dim / 2) % 8 == 0 && Aligned16({x, cos, sin, out});
  if (kind == FloatKind::kF32) {
    const auto* xf = static_cast<const float*>(x);
    const auto* cf = static_cast<const float*>(cos);
    const auto* sf = static_cast<const float*>(sin);
    auto* of = static_cast<float*>(out);
    return pairs ? Launch(RotaryPairsKernel<float>, Blocks(n / 16), kThreads, s, xf, cf, sf, rows,
                          heads, head_dim, of)
                 : Launch(RotaryKernel<float>, Blocks(n), kThreads, s, xf, cf, sf, rows, heads,
                          head_dim, of);
  } else if (kind == FloatKind::kBF16) {
    const auto* xb = static_cast<const __nv_bfloat16*>(x);
    const auto* cb = static_cast<const __nv_bfloat16*>(cos);
    const auto* sb = static_cast<const __nv_bfloat16*>(sin);
    auto* ob = static_cast<__nv_bfloat16*>(out);
    return pairs ? Launch(RotaryPairsKernel<__nv_bfloat16>, Blocks(n / 16), kThreads, s, xb, cb, sb,
                          rows, heads, head_dim, ob)
                 : Launch(RotaryKernel<__nv_bfloat16>, Blocks(n), kThreads, s, xb, cb, sb, rows,
                          heads, head_dim, ob);
  } else {
    return "rotary: fp32 or bf16 only";
  }
}

const char* rotary_store_cuda(const RotaryStoreArgs& a, FloatKind kind, void* stream) {
  if (a.head_dim % 2 != 0) return "rotary_store: head_dim must be even";
  const int64_t n = a.rows * (a.heads + 2 * a.kv_heads) * a.head_dim;
  if (n <= 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  const auto launch = [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    return Launch(RotaryStoreKernel<T>, Blocks(n), kThreads, s, static_cast<const T*>(a.q),
                  static_cast<const T*>(a.k), static_cast<const T*>(a.v),
                  static_cast<const T*>(a.cos), static_cast<const T*>(a.sin), a.slots,
                  static_cast<T*>(a.q_out), static_cast<T*>(a.k_pool), static_cast<T*>(a.v_pool),
                  a.rows, a.heads, a.kv_heads, a.head_dim);
  };
  if (kind == FloatKind::kF32) return launch(static_cast<float*>(nullptr));
  if (kind == FloatKind::kBF16) return launch(static_cast<__nv_bfloat16*>(nullptr));
  return "rotary_store: fp32 or bf16 only";
}

const char* silu_mul_cuda(const void* gate, const void* up, FloatKind kind, int64_t n, void* out,
                          void* stream) {
  if (n <= 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  const bool vec = Aligned16({gate, up, out});
  if (kind == FloatKind::kF32) {
    return LaunchElementwise(
        vec, n, s,
        SiluMulBody<float>{static_cast<const float*>(gate), static_cast<const float*>(up),
                           static_cast<float*>(out)});
  } else if (kind == FloatKind::kBF16) {
    return LaunchElementwise(vec, n, s,
                             SiluMulBody<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(gate),
                                                        static_cast<const __nv_bfloat16*>(up),
                                                        static_cast<__nv_bfloat16*>(out)});
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
  const bool vec = Aligned16({gate, up, dy, d_gate, d_up});
  if (kind == FloatKind::kF32) {
    return LaunchElementwise(
        vec, n, s,
        SiluMulBackwardBody<float>{static_cast<const float*>(gate), static_cast<const float*>(up),
                                   static_cast<const float*>(dy), static_cast<float*>(d_gate),
                                   static_cast<float*>(d_up)});
  } else if (kind == FloatKind::kBF16) {
    return LaunchElementwise(
        vec, n, s,
        SiluMulBackwardBody<__nv_bfloat16>{
            static_cast<const __nv_bfloat16*>(gate), static_cast<const __nv_bfloat16*>(up),
            static_cast<const __nv_bfloat16*>(dy), static_cast<__nv_bfloat16*>(d_gate),
            static_cast<__nv_bfloat16*>(d_up)});
  } else {
    return "silu_mul_backward: fp32 or bf16 only";
  }
}

}  // namespace lorad::kernels
