// 4-bit matrix product for decode batches on tensor cores: y = x @ W^T with W held as NF4
// (kernels/nf4.h) and x 1..kNf4MmaMaxRows rows of bf16 or fp16.
//
// Semantics: y[r, o] = sum_k x[r, k] * (code_T[q(o * in + k)] * absmax[(o * in + k) / 64])
//   where code_T is kNf4Code rounded to nearest (ties to even) in x's type T, because the tensor
//   cores multiply T by T: each product code_T * x is exact in fp32, the sums are fp32 in an
//   unspecified order, each 64-block's sum is scaled by its absmax (double-quantized, rebuilt as
//   the CPU does it), and y is rounded to T. bitsandbytes' own 4-bit GEMV also rounds the levels
//   to T (and the absmax too); this kernel keeps the absmax in fp32.
// The CPU reference nf4_mma_cpu is nf4_gemv_cpu with the rounded code book; the kernel matches it
// within the rounding of fp32 sums taken in another order.
// A row of y never depends on the values of the other rows of x, but the order of the fp32 sums
// follows the launch's tiling, which depends on the number of rows (up to 8, or more) and on the
// weights launched together: the same row may differ in its last bits between those cases.
#pragma once

#include <cstdint>

#include "kernels/float_kind.h"
#include "kernels/nf4.h"

namespace lorad::kernels {

// Rows of x per call: four 8-column tensor-core tiles.
inline constexpr int kNf4MmaMaxRows = 32;
// Weights per grouped call (nf4_mma_group_cuda): q, k, v of an attention layer.
inline constexpr int kNf4MmaMaxTargets = 3;

// kNf4Code rounded to `kind` (bf16 or fp16; fp32 leaves it as is), as fp32 values.
void nf4_code_rounded_to(FloatKind kind, float code[16]);

// x: [rows, in_features] fp32 holding values of `kind`; packed, absmax as nf4_gemv_cpu;
// y: [rows, out_features] fp32 (not rounded to `kind`).
void nf4_mma_cpu(const float* x, int64_t rows, const uint8_t* packed, const float* absmax,
                 int64_t out_features, int64_t in_features, FloatKind kind, float* y);

// An MLP's activation from its gate and up weights (as many rows, sharing x), for bf16 x:
// out = silu_mul(round_bf16(gate), round_bf16(up)) (kernels/layer_ops.h), gate and up each as
// nf4_mma_cpu gives them. out: [rows, out_features] fp32 holding bf16 values.
void nf4_mma_silu_mul_cpu(const float* x, int64_t rows, const uint8_t* gate_packed,
                          const float* gate_absmax, const uint8_t* up_packed,
                          const float* up_absmax, int64_t out_features, int64_t in_features,
                          float* out);

// Declared in every build, defined in CUDA builds only: a CPU build's callers name them in
// the lambdas RunKernel (engine/model/kernel_launch.h) never calls there.
// Whether nf4_mma_cuda handles this problem: x of bf16 or fp16, 1 <= rows <= kNf4MmaMaxRows,
// in_features % 256 == 0 (a pipeline stage reads four 64-blocks of a row) and below 2^32 / 12
// (32-bit row offsets), and x and y 16-byte aligned (checked by the caller). Needs sm_80 or later,
// and the kernels for `rows` must fit the current device's shared memory (all do on sm_90; on an
// A100 those for 9 rows and more do not, on sm_86 / sm_89 none does): false otherwise, so that the
// caller takes another product.
bool nf4_mma_cuda_supports(int64_t rows, int64_t in_features, FloatKind kind);

// Device pointers; x [rows, in_features] and y [rows, out_features] row-major, of `kind`.
// absmax: device pointers plus the host-side offset. Enqueued on `stream` (a cudaStream_t);
// returns nullptr on success or an error string. `overlapped`: programmatic dependent launch, as
// nf4_gemv_cuda_overlapped (the weights are read before the preceding kernel on the stream ends,
// x only after).
const char* nf4_mma_cuda(const void* x, FloatKind kind, int64_t rows, const uint8_t* packed,
                         const Nf4Absmax& absmax, int64_t out_features, int64_t in_features,
                         void* y, void* stream, bool overlapped);

// One weight of a grouped product: y = x @ W^T, W [out_features, in_features] as NF4 (device
// pointers; absmax with its own code book and offset), y [rows, out_features] of x's kind.
struct Nf4MmaTarget {
  const uint8_t* packed = nullptr;
  Nf4Absmax absmax;
  int64_t out_features = 0;
  void* y = nullptr;
};

// nf4_mma_cuda for 1..kNf4MmaMaxTargets weights sharing x and in_features, in one launch (q, k and
// v of a layer; gate and up): each output is what nf4_mma_cuda gives for its weight alone, and
// one launch fills the GPU where k's and v's 1024 rows alone would leave half of it idle.
const char* nf4_mma_group_cuda(const void* x, FloatKind kind, int64_t rows,
                               const Nf4MmaTarget* targets, int count, int64_t in_features,
                               void* stream, bool overlapped);

// nf4_mma_silu_mul_cpu on the device, bf16 only: gate and up in one launch whose blocks each sum
// both halves of a pair of 16- or 32-row tiles and write out = silu(gate) * up, so the MLP's gate
// and up outputs never reach memory and no activation kernel follows. gate.y and up.y are
// ignored; out [rows, out_features] bf16. `blocks`: 0 for the planner's grid, else that many
// blocks (the GPU tests).
const char* nf4_mma_silu_mul_cuda(const void* x, FloatKind kind, int64_t rows,
                                  const Nf4MmaTarget& gate, const Nf4MmaTarget& up,
                                  int64_t in_features, void* out, void* stream, bool overlapped,
                                  int64_t blocks = 0);

// nf4_mma_cuda on `blocks` blocks (at most one per row tile and per resident block; more tiles
// per block than its shared memory allows run in rounds) instead of the planner's grid, so that
// the tiles and their reduction axis are split in other ways. For bench/nf4_gemv_bench.cu and the
// GPU tests.
const char* nf4_mma_cuda_blocks(int64_t blocks, const void* x, FloatKind kind, int64_t rows,
                                const uint8_t* packed, const Nf4Absmax& absmax,
                                int64_t out_features, int64_t in_features, void* y, void* stream);

#if defined(LORAD_NF4_MMA_TIMELINE)
// Diagnostics (kernels/nf4_mma_timeline.cuh): what the kernel records per block of a launch.
inline constexpr int kNf4TimelineLaunches = 8, kNf4TimelineBlocks = 1024, kNf4TimelinePoints = 32;
enum Nf4MmaTimelinePoint {
  kTimelineStartNs,     // %globaltimer at the block's start
  kTimelineEndNs,       // ... and at its end
  kTimelineSm,          // %smid
  kTimelineStart,       // clock64 (thread 0 unless said) at the start,
  kTimelineRanged,      // the block's range and the warp's share of it known,
  kTimelinePointed,     // the first segment's addresses known,
  kTimelineIssued,      // the first copies issued,
  kTimelineTableBuilt,  // pair table and code2 built,
  kTimelineWaited,      // the predecessor waited for,
  kTimelineSynced,      // the block's barrier after that,
  kTimelineFirstStage,  // the first stage landed,
  kTimelineReduce,      // every warp done with its stages (the barrier after them),
  kTimelineEnd,         // y stored;
  kTimelineWarpDone,    // + w: warp w done with its stages (its lane 0)
};
// Copies g_nf4_timeline ([launch slot][block][point]) to `host` and clears it; nonzero on error.
int nf4_mma_timeline_copy(unsigned long long* host);
#endif  // LORAD_NF4_MMA_TIMELINE

}  // namespace lorad::kernels
