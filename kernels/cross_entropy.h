// Cross entropy of rows of logits against target ids, with the gradient of the summed loss with
// respect to the logits, in one kernel: two reads of the logits and one write of the gradient,
// where the torch ops (cast to fp32, logsumexp, exp, scatter, mask, cast back) move the [rows,
// vocab] block about 20 times. The trainer's chunked loss (engine/train/chunked_cross_entropy.*)
// runs it on each chunk of lm_head logits.
//
// Semantics, row r of logits x [rows, vocab] (fp32 or bf16, T), t = targets[r]:
//   m = max_j x[j];  s = sum_j exp(x[j] - m);  lse = m + log(s)      (fp32; the sum's order is
//   free) t in [0, vocab):  loss[r] = lse - x[t],  grad[r, j] = round_T(exp(x[j] - lse) - (j == t))
//   otherwise (ignore_index, or out of range): loss[r] = 0, grad[r, j] = 0
// grad may be null (the loss alone).
#pragma once

#include <cstdint>

#include "kernels/float_kind.h"

namespace lorad::kernels {

void cross_entropy_rows_cpu(const void* logits, FloatKind kind, const int64_t* targets,
                            int64_t rows, int64_t vocab, float* loss, void* grad);

// Declared in every build, defined in CUDA builds only: a CPU build's callers name them in
// the lambdas RunKernel (engine/model/kernel_launch.h) never calls there.
// Device pointers, enqueued on `stream` (a cudaStream_t); nullptr on success or an error. fp32 or
// bf16.
const char* cross_entropy_rows_cuda(const void* logits, FloatKind kind, const int64_t* targets,
                                    int64_t rows, int64_t vocab, float* loss, void* grad,
                                    void* stream);

}  // namespace lorad::kernels
