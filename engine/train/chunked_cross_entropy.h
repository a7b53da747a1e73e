// ChunkedCrossEntropy: the summed next-token cross entropy of hidden states under a frozen
// lm_head, computed a chunk of positions at a time so full-vocabulary fp32 logits exist for
// `chunk` positions only, never for the whole batch (a [2, 2048, 128256] fp32 tensor is 2 GiB).
//
// Semantics: sum_i [target_i != ignore] (logsumexp(z_i) - z_i[target_i]), z_i = float(h_i @ W^T).
// With grad enabled and `hidden` requiring grad, the gradient w.r.t. hidden,
// (softmax(z_i) - onehot(target_i)) @ W per chunk, is computed during the forward (the loss is a
// scalar) and kept in hidden's dtype; backward scales it by the incoming gradient. So the
// backward holds [N, hidden], not [N, vocab]. lm_head gets no gradient.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace lorad::engine {

// hidden [N, H] (compute dtype), lm_head [V, H], targets [N] int64 (ignore_index = skipped);
// returns a 0-dim fp32 tensor, differentiable w.r.t. hidden. Throws c10::Error on bad shapes.
torch::Tensor ChunkedCrossEntropySum(const torch::Tensor& hidden, const torch::Tensor& lm_head,
                                     const torch::Tensor& targets, int64_t chunk,
                                     int64_t ignore_index = -100);

}  // namespace lorad::engine
