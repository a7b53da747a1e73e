// One AdamW step with 8-bit block-wise quantized moments: bitsandbytes' AdamW8bit
// (bnb.optim.AdamW8bit, what transformers' optim="adamw_8bit" builds), for parameters with at
// least min_8bit_size elements. Smaller parameters keep fp32 moments (engine/train/optimizer.cpp).
//
// State of a parameter of n elements, blocks of kAdamW8bitBlockSize (the last may be short):
//   q1      [n]                    uint8  first moment m, index into code1 (signed dynamic map)
//   q2      [n]                    uint8  second moment v, index into code2 (unsigned dynamic map)
//   absmax1 [ceil(n / 256)]        fp32   scale of each block of m
//   absmax2 [ceil(n / 256)]        fp32   scale of each block of v
// A fresh state is all zeros (bitsandbytes' init_state), which dequantizes to m = v = 0.
//
// Where bitsandbytes' own backends differ, this follows:
//   - quantization: the nearest code by the binary search of bitsandbytes' CUDA optimizer kernel
//     (quantize_2D, then the sign fix for m). Its CPU backend quantizes through a 65536-bin table
//     that maps every |x| below ~2e-5 (relative to the block's absmax) to +-2.1e-5, so our states
//     equal bitsandbytes' CUDA kernel's, not its CPU backend's, for small moments;
//   - the parameter update: bitsandbytes' formula p += step_size * m / (sqrt(v) + eps * c2) with
//     weight decay applied first (p *= 1 - lr * wd), as torch.optim.AdamW and bitsandbytes' CPU
//     backend do (its CUDA kernel decays after the update; the two differ by lr * wd * update);
//   - the moment updates round like torch's CPU kernels (one fused multiply-add each), so they
//     equal bitsandbytes' CPU backend bit for bit before quantization;
//   - a non-finite gradient element resets that element's moments to 0 and leaves its parameter
//     unchanged (bitsandbytes' CUDA kernel; its CPU backend propagates the NaN).
//
// Raw pointers and sizes; the CPU function is the specification and the CUDA one (adamw8bit.cu)
// matches it bit for bit (explicit roundings, correctly rounded division and square root).
#pragma once

#include <cstdint>

namespace lorad::kernels {

inline constexpr int kAdamW8bitBlockSize = 256;

// create_dynamic_map(signed=False) as bitsandbytes computes it (fp32, sorted ascending): the code
// book of the second moment. The first moment uses kDynamicMapSigned (dynamic_quant8.h).
// tests/parity/optimizers_parity_test.cpp checks both against the installed bitsandbytes.
extern const float kDynamicMapUnsigned[256];

// The per-step scalars, computed on the host in double precision as bitsandbytes' and torch's
// Python code does, then rounded to fp32 where their kernels compute in fp32.
struct AdamW8bitScalars {
  float beta1 = 0.f;
  float one_minus_beta1 = 0.f;  // fp32(1 - beta1), not 1 - fp32(beta1)
  float beta2 = 0.f;
  float one_minus_beta2 = 0.f;
  float step_size = 0.f;     // -lr * sqrt(1 - beta2^t) / (1 - beta1^t)
  float eps_scaled = 0.f;    // eps * sqrt(1 - beta2^t)
  float decay = 1.f;         // 1 - lr * weight_decay
  bool apply_decay = false;  // weight_decay > 0
};

// step: 1 for the first update of this parameter.
AdamW8bitScalars adamw8bit_scalars(double lr, double beta1, double beta2, double eps,
                                   double weight_decay, int64_t step);

// Semantics: the index of the code nearest x, as bitsandbytes' quantize_2D finds it: a 7-level
// binary search over code[0..254] (sorted ascending, 256 entries), then x against the fp32
// midpoint with the neighbour on its side; x exactly on a midpoint keeps the index the search
// ended on. lower_bound is the value below code[0] the search starts from: -1 for the signed map,
// 0 for the unsigned one. NaN gives 0.
uint8_t dynamic_code_index(const float* code, float lower_bound, float x);

// Semantics, for every element i of block b (g = grad[i], p = param[i]):
//   m = code1[q1[i]] * absmax1[b]               v = code2[q2[i]] * absmax2[b]   (old scales)
//   g finite:     m = fma(g, 1-beta1, m*beta1)   v = fma((1-beta2)*g, g, v*beta2)
//   g not finite: m = v = 0, p unchanged
//   absmax1[b] = max |m|, absmax2[b] = max |v| over the block                  (new scales)
//   g finite:     p = p * decay (if apply_decay);  p = fma(m / (sqrt(v) + eps_scaled), step_size,
//   p) q1[i] = dynamic_code_index(code1, -1, m / absmax1[b]); if code1[q1[i]] and m differ in sign
//           bit, q1[i] moves one code toward m's side (+1 if m > 0, else -1, modulo 256)
//   q2[i] = dynamic_code_index(code2, 0, v / absmax2[b])
// A block of zero moments has absmax 0 and x = 0/0 = NaN; its codes dequantize to 0 either way.
// param, grad: [n] fp32; q1, q2: [n]; absmax1, absmax2: [ceil(n / 256)]; code1, code2: [256].
void adamw8bit_step_cpu(float* param, const float* grad, uint8_t* q1, uint8_t* q2, float* absmax1,
                        float* absmax2, const float* code1, const float* code2, int64_t n,
                        const AdamW8bitScalars& s);

// Declared in every build, defined in CUDA builds only: a CPU build's callers name them in
// the lambdas RunKernel (engine/model/kernel_launch.h) never calls there.
// Same contract as adamw8bit_step_cpu, device pointers (code books too), enqueued on `stream`
// (a cudaStream_t). One thread block per 256-element block. Returns nullptr on success or the CUDA
// error string.
const char* adamw8bit_step_cuda(float* param, const float* grad, uint8_t* q1, uint8_t* q2,
                                float* absmax1, float* absmax2, const float* code1,
                                const float* code2, int64_t n, const AdamW8bitScalars& s,
                                void* stream);

}  // namespace lorad::kernels
