// The elementwise parts of a Llama decoder layer, fused: each is one kernel instead of the 2-7
// torch ops the model's reference path launches, which matters when a decode step is a chain of
// ~1,000 tiny kernels (batch 1). Each op rounds where transformers' bf16 code rounds, so the
// fused and unfused paths agree to the last bit except where a reduction order differs.
//
// Element type T (fp32 or bf16) for every tensor; all arithmetic in fp32; round_T() rounds to T
// (the identity for fp32).
//
// rms_norm (transformers' LlamaRMSNorm): for each of `rows` rows of `width`,
//   r      = 1 / sqrt(sum_i x[i]^2 / width + eps)          (fp32; the sum's order is free)
//   out[i] = round_T(float(weight[i]) * float(round_T(x[i] * r)))
//
// add_rms_norm (a residual add and the RMSNorm after it, as one kernel: inference only):
//   sum[i] = round_T(x[i] + delta[i]), then out = rms_norm(sum) as above.
//
// rotary (transformers' apply_rotary_pos_emb on one tensor): x [rows, heads, head_dim] where row
// r's cos and sin are [head_dim] at cos + r * head_dim; half = head_dim / 2,
//   rot[d]   = d < half ? -x[d + half] : x[d - half]
//   out[d]   = round_T(float(round_T(x[d] * cos[d])) + float(round_T(rot[d] * sin[d])))
//
// rotary_store (a decode step's rotary and paged KV-cache write, as one kernel; the engine's CUDA
// decode has the attention launch do it, kernels/paged_attention_rotary_cuda): for row r <
// rows, with slot s = slots[r] (int64),
//   q_out[r]  = rotary(q[r])     q, q_out [rows, heads, head_dim], cos and sin as above
//   k_pool[s] = rotary(k[r])     k [rows, kv_heads, head_dim], k_pool [slots, kv_heads, head_dim]
//   v_pool[s] = v[r]             v, v_pool likewise
// Rows sharing a slot (a decode batch's padding rows) leave one of theirs there.
//
// silu_mul (LlamaMLP's act_fn(gate) * up): out[i] = round_T(float(round_T(silu(g[i]))) * u[i]),
//   silu(g) = g / (1 + exp(-g)).
//
// The backward passes, for training (the layer's weights are frozen: only the input gradients):
//
// rms_norm_backward: dy the gradient of out, r as above,
//   g[i]  = round_T(dy[i] * weight[i])
//   dx[i] = round_T(g[i] * r - x[i] * r^3 * (sum_j g[j] * x[j]) / width)
//   (torch's autograd of the reference ops: the same roundings, the fp32 sums in another order)
//
// rotary backward is rotary itself with -sin, when each row's sin repeats across its two halves
// (sin[d] == sin[d + half], as RoPE's cat(freqs, freqs) builds it): no kernel of its own.
//
// silu_mul_backward: dy the gradient of out, s = 1 / (1 + exp(-g)),
//   d_up[i]   = round_T(dy[i] * round_T(silu(g[i])))      (the forward's silu, as it rounded it)
//   d_gate[i] = round_T(round_T(dy[i] * u[i]) * s * (1 + g[i] * (1 - s)))
#pragma once

#include <cstdint>

#include "kernels/float_kind.h"

namespace lorad::kernels {

void rms_norm_cpu(const void* x, const void* weight, FloatKind kind, int64_t rows, int64_t width,
                  float eps, void* out);
void add_rms_norm_cpu(const void* x, const void* delta, const void* weight, FloatKind kind,
                      int64_t rows, int64_t width, float eps, void* sum, void* out);
void rotary_cpu(const void* x, const void* cos, const void* sin, FloatKind kind, int64_t rows,
                int64_t heads, int64_t head_dim, void* out);
// The tensors of rotary_store.
struct RotaryStoreArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* cos = nullptr;
  const void* sin = nullptr;
  const int64_t* slots = nullptr;
  void* q_out = nullptr;
  void* k_pool = nullptr;
  void* v_pool = nullptr;
  int64_t rows = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
};
void rotary_store_cpu(const RotaryStoreArgs& args, FloatKind kind);
void silu_mul_cpu(const void* gate, const void* up, FloatKind kind, int64_t n, void* out);
void rms_norm_backward_cpu(const void* x, const void* weight, const void* dy, FloatKind kind,
                           int64_t rows, int64_t width, float eps, void* dx);
void silu_mul_backward_cpu(const void* gate, const void* up, const void* dy, FloatKind kind,
                           int64_t n, void* d_gate, void* d_up);

// Declared in every build, defined in CUDA builds only: a CPU build's callers name them in
// the lambdas RunKernel (engine/model/kernel_launch.h) never calls there.
// Device pointers, enqueued on `stream` (a cudaStream_t); nullptr on success or an error. kF16 is
// refused. rotary and rotary_store need an even head_dim.
const char* rms_norm_cuda(const void* x, const void* weight, FloatKind kind, int64_t rows,
                          int64_t width, float eps, void* out, void* stream);
const char* add_rms_norm_cuda(const void* x, const void* delta, const void* weight, FloatKind kind,
                              int64_t rows, int64_t width, float eps, void* sum, void* out,
                              void* stream);
const char* rotary_cuda(const void* x, const void* cos, const void* sin, FloatKind kind,
                        int64_t rows, int64_t heads, int64_t head_dim, void* out, void* stream);
const char* rotary_store_cuda(const RotaryStoreArgs& args, FloatKind kind, void* stream);
const char* silu_mul_cuda(const void* gate, const void* up, FloatKind kind, int64_t n, void* out,
                          void* stream);
const char* rms_norm_backward_cuda(const void* x, const void* weight, const void* dy,
                                   FloatKind kind, int64_t rows, int64_t width, float eps, void* dx,
                                   void* stream);
const char* silu_mul_backward_cuda(const void* gate, const void* up, const void* dy, FloatKind kind,
                                   int64_t n, void* d_gate, void* d_up, void* stream);

}  // namespace lorad::kernels
