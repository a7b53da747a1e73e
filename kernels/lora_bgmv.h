// Multi-adapter LoRA for batched serving: every row of a batch may use a different adapter (or
// none), and the LoRA delta of the whole batch is computed in one pass (S-LoRA / Punica's BGMV
// for decode rows, SGMV for prefill segments).
//
// Semantics (vLLM's punica: y[i] += (x[i] @ lora_a[s]) @ lora_b[s] * scale[s]), for row b with
// adapter s = adapter_of(b), 0 <= s < num_slots (anything else: no adapter, y[b, :] untouched):
//   t[r]    = sum_k A_s[r, k] * x[b, k]                       r < rank[s],  fp32
//   y[b, o] = round_T(float(y[b, o]) + scale[s] * sum_r B_s[o, r] * t[r])    fp32, rounded once
// x, y, A and B share one element type T (fp32 or bf16); every product and sum is fp32.
// The CPU reference sums in the order written (k = 0.., then r = 0..); the CUDA kernels sum in a
// different order, so they match within rounding, not bit for bit.
//
// Adapter layout: pointer arrays, one entry per device slot, so adapters of different ranks live
// in their own allocations with no padding (the adapter store owns them; PEFT's shapes as is):
//   a[s]: [rank[s], in_features]   row-major (PEFT lora_A.weight)
//   b[s]: [out_features, rank[s]]  row-major (PEFT lora_B.weight)
// scale[s] is alpha / rank (or alpha / sqrt(rank) for rsLoRA), computed by the caller.
//
// BGMV (decode): adapter_of(b) = adapter_index[b].
// SGMV (prefill): the rows come in contiguous segments, segment g = rows
//   [segment_starts[g], segment_starts[g + 1]) with adapter segment_adapter[g];
//   segment_starts[0] == 0 and segment_starts[num_segments] == rows.
#pragma once

#include <cstdint>

#include "kernels/float_kind.h"

namespace lorad::kernels {

// The adapters resident on the device. For the CPU functions every pointer is a host pointer; for
// the CUDA functions every pointer (the arrays and what a[s], b[s] point to) is a device pointer.
struct LoraAdapterTable {
  const void* const* a = nullptr;  // [num_slots] -> [rank[s], in_features] of T
  const void* const* b = nullptr;  // [num_slots] -> [out_features, rank[s]] of T
  const int32_t* rank = nullptr;   // [num_slots], each in [0, max_rank]
  const float* scale = nullptr;    // [num_slots]
  int32_t num_slots = 0;
  int32_t max_rank = 0;  // >= every rank[s]; sizes the CUDA scratch
};

// x: [rows, in_features] of `kind`; y: [rows, out_features] of `kind`, updated in place;
// adapter_index: [rows] int32. `kind` must be kF32 or kBF16 (kF16 leaves y untouched).
void lora_bgmv_cpu(const void* x, FloatKind kind, int64_t rows, int64_t in_features,
                   const int32_t* adapter_index, const LoraAdapterTable& table,
                   int64_t out_features, void* y);

// segment_starts: [num_segments + 1] int64; segment_adapter: [num_segments] int32.
void lora_sgmv_cpu(const void* x, FloatKind kind, int64_t in_features,
                   const int64_t* segment_starts, const int32_t* segment_adapter,
                   int64_t num_segments, const LoraAdapterTable& table, int64_t out_features,
                   void* y);

// The projections of a decoder layer that share their input (q, k and v; gate and up) take their
// LoRA deltas in one launch pair: one target per projection, each with its own adapters (tables of
// the same slots), output width and output.
struct LoraTarget {
  LoraAdapterTable table;
  int64_t out_features = 0;
  void* y = nullptr;  // [rows, out_features] of the kind of x, updated in place
};
constexpr int kMaxLoraTargets = 3;

// Declared in every build, defined in CUDA builds only: a CPU build's callers name them in
// the lambdas RunKernel (engine/model/kernel_launch.h) never calls there.
// Bytes of device scratch the CUDA launchers need: the fp32 partial sums of t = A x, one per
// 512-wide chunk of in_features, [chunks, rows, max_rank] per target. total_max_rank: the sum of
// table.max_rank over the targets of the launch (table.max_rank for the single-target launchers).
int64_t lora_scratch_bytes(int64_t rows, int64_t in_features, int64_t total_max_rank);

// Device pointers (see LoraAdapterTable), enqueued on `stream` (a cudaStream_t). scratch: at least
// lora_scratch_bytes(rows, in_features, table.max_rank) bytes, 4-byte aligned. Return nullptr on
// success or an error. Launched with programmatic dependent launch (the launches overlap the
// previous kernel's tail), so adapter_index and segment_* must be written before the kernel that
// precedes them on the stream starts (as host-to-device copies before a forward are).
const char* lora_bgmv_cuda(const void* x, FloatKind kind, int64_t rows, int64_t in_features,
                           const int32_t* adapter_index, const LoraAdapterTable& table,
                           int64_t out_features, void* y, void* scratch, void* stream);

// BGMV for 1..kMaxLoraTargets projections of the same x and the same rows: the same result as
// lora_bgmv_cuda on each target in turn, in two launches instead of two per target.
const char* lora_bgmv_group_cuda(const void* x, FloatKind kind, int64_t rows, int64_t in_features,
                                 const int32_t* adapter_index, const LoraTarget* targets,
                                 int num_targets, void* scratch, void* stream);

// rows: segment_starts[num_segments], passed from the host because the launch grid depends on it.
const char* lora_sgmv_cuda(const void* x, FloatKind kind, int64_t rows, int64_t in_features,
                           const int64_t* segment_starts, const int32_t* segment_adapter,
                           int64_t num_segments, const LoraAdapterTable& table,
                           int64_t out_features, void* y, void* scratch, void* stream);

}  // namespace lorad::kernels
