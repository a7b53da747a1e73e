// Decode attention over a paged KV cache (vLLM's PagedAttention layout): one new query token per
// row, attending to every cached key of its own sequence, wherever the sequence's blocks lie in
// the pool. Every input is a device array, so a decode step that uses it can be captured in a
// CUDA graph once and replayed with new block tables and lengths.
//
// Semantics, for row b < rows, query head h < heads, kv head g = h / (heads / kv_heads):
//   n      = context_lens[b]                    keys of row b, 1 <= n <= max_blocks * block_size
//   slot(t)= block_tables[b * max_blocks + t / block_size] * block_size + t % block_size
//   s[t]   = scale * sum_d q[b, h, d] * k_pool[slot(t), g, d]             t < n
//   p[t]   = exp(s[t] - max_t s) / sum_t exp(s[t] - max_t s)
//   out[b, h, d] = round_T(sum_t p[t] * v_pool[slot(t), g, d])
// q, out: [rows, heads, head_dim]; k_pool, v_pool: [slots, kv_heads, head_dim]; all of one element
// type T (fp32 or bf16); every product and sum in fp32. block_tables: [rows, max_blocks] int32,
// only the first ceil(n / block_size) entries of a row are read. The CPU reference computes the
// softmax in three passes in the order written; the CUDA kernel uses an online softmax over tiles
// of keys, so the two agree within rounding, not bit for bit.
#pragma once

#include <cstdint>

#include "kernels/float_kind.h"

namespace lorad::kernels {

struct PagedAttentionShape {
  int64_t rows = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;    // divides heads
  int64_t head_dim = 0;    // CUDA: a multiple of 32, at most 256
  int64_t block_size = 0;  // tokens per block
  int64_t max_blocks = 0;  // entries per row of block_tables
};

// Empty string when the shape is usable, else what is wrong with it.
const char* paged_attention_check(const PagedAttentionShape& shape);

void paged_attention_cpu(const void* q, const void* k_pool, const void* v_pool, FloatKind kind,
                         const int32_t* block_tables, const int32_t* context_lens,
                         const PagedAttentionShape& shape, float scale, void* out);

// A decode step's rotary embedding and cache write (kernels/layer_ops.h, rotary_store) done by the
// attention launch itself (paged_attention_rotary_cuda): q is the projection's q before rotation,
// and each row's new key (rotated) and value go to the pools at slots[row], which must be the slot
// of the row's last key (position context_lens[row] - 1). No rotated q is written.
struct PagedAttentionRotary {
  const void* k = nullptr;         // [rows, kv_heads, head_dim], before rotation
  const void* v = nullptr;         // [rows, kv_heads, head_dim]
  const void* cos = nullptr;       // [rows, head_dim]
  const void* sin = nullptr;       // [rows, head_dim]
  const int64_t* slots = nullptr;  // [rows]
};

// Declared in every build, defined in CUDA builds only: a CPU build's callers name them in
// the lambdas RunKernel (engine/model/kernel_launch.h) never calls there.
// Device pointers, enqueued on `stream` (a cudaStream_t). Returns nullptr on success or an error.
const char* paged_attention_cuda(const void* q, const void* k_pool, const void* v_pool,
                                 FloatKind kind, const int32_t* block_tables,
                                 const int32_t* context_lens, const PagedAttentionShape& shape,
                                 float scale, void* out, void* stream);

// rotary_store_cuda then paged_attention_cuda in one launch, the same bits (and one kernel fewer
// a decoder layer): the blocks that attend to a row's last key rotate it and write it and its
// value to the pools first, and every block rotates its queries as it loads them. fp32 or bf16;
// k, v, cos and sin of q's kind.
const char* paged_attention_rotary_cuda(const void* q, void* k_pool, void* v_pool, FloatKind kind,
                                        const int32_t* block_tables, const int32_t* context_lens,
                                        const PagedAttentionShape& shape, float scale,
                                        const PagedAttentionRotary& rotary, void* out,
                                        void* stream);

}  // namespace lorad::kernels
