// CUDA implementation of kernels/lora_bgmv.h. Raw pointers only: no torch headers here.
//
// Two launches, as Punica's shrink/expand: t = A x into an fp32 scratch [rows, max_rank], then
// y += scale * B t. Both cut the rows into tiles of kTileRows consecutive rows; inside a tile, a
// run of rows with the same adapter shares every weight it reads (a prefill segment is one long
// run, so A and B are read once per tile instead of once per row; a decode batch of different
// adapters degrades to runs of one row, which is BGMV). The row -> adapter map is the only
// difference between BGMV (an index per row) and SGMV (a binary search over segment starts).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/device_float.cuh"
#include "kernels/lora_bgmv.h"

namespace lorad::kernels {
namespace {

constexpr int kTileRows = 8;         // rows per tile, sharing the weights of a run
constexpr int kShrinkThreads = 256;  // threads splitting in_features for one rank row
constexpr int kExpandThreads = 256;  // output columns per expand block

struct IndexPerRow {  // BGMV
  const int32_t* adapter_index;
  __device__ int32_t operator()(int64_t row) const { return adapter_index[row]; }
};

struct Segments {  // SGMV: the last segment whose start is <= row
  const int64_t* starts;
  const int32_t* adapter;
  int64_t num_segments;
  __device__ int32_t operator()(int64_t row) const {
    int64_t lo = 0, hi = num_segments - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) >> 1;
      if (starts[mid] <= row) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return adapter[lo];
  }
};

// The tile's adapter slots into shared memory (-1 for no adapter or a row past the end).
template <typename AdapterOf>
__device__ __forceinline__ void LoadTileSlots(AdapterOf adapter_of, int64_t row0, int64_t rows,
                                              int32_t num_slots, int32_t* slots) {
  if (threadIdx.x < kTileRows) {
    const int64_t row = row0 + threadIdx.x;
    int32_t s = row < rows ? adapter_of(row) : -1;
    if (s < 0 || s >= num_slots) s = -1;
    slots[threadIdx.x] = s;
  }
  __syncthreads();
}

__device__ __forceinline__ int RunLength(const int32_t* slots, int j0) {
  int len = 1;
  while (j0 + len < kTileRows && slots[j0 + len] == slots[j0]) ++len;
  return len;
}

// grid: (tiles, max_rank); block (tile, r) computes rank row r of t for every row of the tile
// whose adapter has rank > r. The block's kShrinkThreads threads split in_features (so a single
// decode row still keeps max_rank blocks of 256 threads busy), then reduce across warps.
template <typename T, typename AdapterOf>
__global__ void __launch_bounds__(kShrinkThreads)
    lora_shrink_kernel(const T* __restrict__ x, int64_t rows, int64_t in_features,
                       AdapterOf adapter_of, LoraAdapterTable table, float* __restrict__ t) {
  __shared__ int32_t slots[kTileRows];
  __shared__ float partial[kShrinkThreads / 32][kTileRows];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  LoadTileSlots(adapter_of, row0, rows, table.num_slots, slots);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int r = blockIdx.y;
  for (int j0 = 0; j0 < kTileRows;) {
    const int len = RunLength(slots, j0);
    const int32_t s = slots[j0];
    // The same for every thread of the block (slots is shared, r is the block's), so the
    // barriers below are reached by all or none.
    if (s >= 0 && r < table.rank[s]) {
      const T* a = static_cast<const T*>(table.a[s]) + r * in_features;
      const T* xr = x + (row0 + j0) * in_features;
      float acc[kTileRows];
#pragma unroll
      for (int j = 0; j < kTileRows; ++j) acc[j] = 0.f;
#pragma unroll 4
      for (int64_t k = threadIdx.x; k < in_features; k += kShrinkThreads) {
        const float av = ToFloat(a[k]);
#pragma unroll
        for (int j = 0; j < kTileRows; ++j) {
          if (j < len) acc[j] = fmaf(av, ToFloat(xr[j * in_features + k]), acc[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < kTileRows; ++j) {
        if (j < len) {
          float v = acc[j];
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
          if (lane == 0) partial[warp][j] = v;
        }
      }
      __syncthreads();
      if (threadIdx.x < len) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < kShrinkThreads / 32; ++w) v += partial[w][threadIdx.x];
        t[(row0 + j0 + threadIdx.x) * table.max_rank + r] = v;
      }
      __syncthreads();  // partial is reused by the next run
    }
    j0 += len;
  }
}

// grid: (tiles, ceil(out_features / kExpandThreads)); thread o adds scale * B_s[o, :] . t[row, :]
// to y[row, o] for every row of the tile. The tile's t rows sit in shared memory (broadcast).
template <typename T, typename AdapterOf>
__global__ void __launch_bounds__(kExpandThreads)
    lora_expand_kernel(const float* __restrict__ t, int64_t rows, AdapterOf adapter_of,
                       LoraAdapterTable table, int64_t out_features, T* __restrict__ y) {
  extern __shared__ float t_tile[];  // [kTileRows, max_rank]
  __shared__ int32_t slots[kTileRows];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  for (int i = threadIdx.x; i < kTileRows * table.max_rank; i += blockDim.x) {
    const int64_t row = row0 + i / table.max_rank;
    t_tile[i] = row < rows ? t[row0 * table.max_rank + i] : 0.f;
  }
  LoadTileSlots(adapter_of, row0, rows, table.num_slots, slots);  // also the barrier for t_tile
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (o >= out_features) return;
  for (int j0 = 0; j0 < kTileRows;) {
    const int len = RunLength(slots, j0);
    const int32_t s = slots[j0];
    if (s >= 0) {
      const int32_t rank = table.rank[s];
      const T* b = static_cast<const T*>(table.b[s]) + o * rank;
      float acc[kTileRows];
#pragma unroll
      for (int j = 0; j < kTileRows; ++j) acc[j] = 0.f;
      for (int r = 0; r < rank; ++r) {
        const float bv = ToFloat(b[r]);
#pragma unroll
        for (int j = 0; j < kTileRows; ++j) {
          if (j < len) acc[j] = fmaf(bv, t_tile[(j0 + j) * table.max_rank + r], acc[j]);
        }
      }
      const float scale = table.scale[s];
#pragma unroll
      for (int j = 0; j < kTileRows; ++j) {
        if (j < len) {
          T* p = y + (row0 + j0 + j) * out_features + o;
          // Two roundings, as the CPU reference writes it (y + scale * acc).
          StoreAs(p, __fadd_rn(ToFloat(*p), __fmul_rn(scale, acc[j])));
        }
      }
    }
    j0 += len;
  }
}

template <typename T, typename AdapterOf>
const char* Launch(const T* x, int64_t rows, int64_t in_features, AdapterOf adapter_of,
                   const LoraAdapterTable& table, int64_t out_features, T* y, float* scratch,
                   cudaStream_t stream) {
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  if (tiles > 0x7fffffff) return "lora: too many rows";
  const dim3 shrink_grid(static_cast<unsigned>(tiles), static_cast<unsigned>(table.max_rank));
  lora_shrink_kernel<T><<<shrink_grid, kShrinkThreads, 0, stream>>>(x, rows, in_features,
                                                                    adapter_of, table, scratch);
  const dim3 expand_grid(
      static_cast<unsigned>(tiles),
      static_cast<unsigned>((out_features + kExpandThreads - 1) / kExpandThreads));
  const size_t shared = sizeof(float) * kTileRows * table.max_rank;
  lora_expand_kernel<T><<<expand_grid, kExpandThreads, shared, stream>>>(scratch, rows, adapter_of,
                                                                         table, out_features, y);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename AdapterOf>
const char* Dispatch(const void* x, FloatKind kind, int64_t rows, int64_t in_features,
                     AdapterOf adapter_of, const LoraAdapterTable& table, int64_t out_features,
                     void* y, void* scratch, void* stream) {
  if (rows <= 0 || out_features <= 0 || table.max_rank <= 0 || table.num_slots <= 0) {
    return nullptr;  // nothing to add
  }
  if (table.max_rank > 1024) return "lora: max_rank above 1024";
  const auto s = static_cast<cudaStream_t>(stream);
  switch (kind) {
    case FloatKind::kF32:
      return Launch(static_cast<const float*>(x), rows, in_features, adapter_of, table,
                    out_features, static_cast<float*>(y), static_cast<float*>(scratch), s);
    case FloatKind::kBF16:
      return Launch(static_cast<const __nv_bfloat16*>(x), rows, in_features, adapter_of, table,
                    out_features, static_cast<__nv_bfloat16*>(y), static_cast<float*>(scratch), s);
    case FloatKind::kF16:
      break;
  }
  return "lora: x must be fp32 or bf16";
}

}  // namespace

int64_t lora_scratch_bytes(int64_t rows, const LoraAdapterTable& table) {
  return static_cast<int64_t>(sizeof(float)) * rows * table.max_rank;
}

const char* lora_bgmv_cuda(const void* x, FloatKind kind, int64_t rows, int64_t in_features,
                           const int32_t* adapter_index, const LoraAdapterTable& table,
                           int64_t out_features, void* y, void* scratch, void* stream) {
  return Dispatch(x, kind, rows, in_features, IndexPerRow{adapter_index}, table, out_features, y,
                  scratch, stream);
}

const char* lora_sgmv_cuda(const void* x, FloatKind kind, int64_t rows, int64_t in_features,
                           const int64_t* segment_starts, const int32_t* segment_adapter,
                           int64_t num_segments, const LoraAdapterTable& table,
                           int64_t out_features, void* y, void* scratch, void* stream) {
  if (num_segments <= 0) return nullptr;
  return Dispatch(x, kind, rows, in_features,
                  Segments{segment_starts, segment_adapter, num_segments}, table, out_features, y,
                  scratch, stream);
}

}  // namespace lorad::kernels
