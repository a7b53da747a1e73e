#include "engine/train/chunked_cross_entropy.h"

#include <algorithm>

namespace lorad::engine {
namespace {

// Loss and d(loss)/d(hidden) of one chunk. h [n, H], targets [n].
std::pair<torch::Tensor, torch::Tensor> ChunkLossAndGrad(const torch::Tensor& h,
                                                         const torch::Tensor& w,
                                                         const torch::Tensor& targets,
                                                         int64_t ignore_index, bool want_grad) {
  const torch::Tensor logits = torch::linear(h, w).to(torch::kFloat);  // [n, V]
  const torch::Tensor valid = targets != ignore_index;                 // [n]
  const torch::Tensor safe = torch::where(valid, targets, torch::zeros_like(targets));
  const torch::Tensor lse = torch::logsumexp(logits, -1);                    // [n]
  const torch::Tensor picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1);  // [n]
  const torch::Tensor loss = ((lse - picked) * valid.to(torch::kFloat)).sum();
  if (!want_grad) return {loss, torch::Tensor()};
  torch::Tensor g = torch::exp(logits - lse.unsqueeze(1));  // softmax, [n, V]
  g.scatter_add_(1, safe.unsqueeze(1), -torch::ones({g.size(0), 1}, g.options()));
  g.mul_(valid.to(torch::kFloat).unsqueeze(1));
  return {loss, torch::matmul(g.to(h.scalar_type()), w)};  // [n, H]
}

class ChunkedCrossEntropyFunction
    : public torch::autograd::Function<ChunkedCrossEntropyFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& hidden,
                               const torch::Tensor& lm_head, const torch::Tensor& targets,
                               int64_t chunk, int64_t ignore_index) {
    const int64_t n = hidden.size(0);
    torch::Tensor total = torch::zeros({}, hidden.options().dtype(torch::kFloat));
    torch::Tensor grad = torch::empty_like(hidden);
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t len = std::min(chunk, n - start);
      auto [loss, g] = ChunkLossAndGrad(hidden.narrow(0, start, len), lm_head,
                                        targets.narrow(0, start, len), ignore_index, true);
      total += loss;
      grad.narrow(0, start, len).copy_(g);
    }
    ctx->save_for_backward({grad});
    return total;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const torch::Tensor grad = ctx->get_saved_variables()[0];
    return {grad * grad_out[0].to(grad.scalar_type()), torch::Tensor(), torch::Tensor(),
            torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor ChunkedCrossEntropySum(const torch::Tensor& hidden, const torch::Tensor& lm_head,
                                     const torch::Tensor& targets, int64_t chunk,
                                     int64_t ignore_index) {
  TORCH_CHECK(hidden.dim() == 2 && lm_head.dim() == 2 && hidden.size(1) == lm_head.size(1),
              "ChunkedCrossEntropySum: hidden [N, H] and lm_head [V, H] expected");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "ChunkedCrossEntropySum: targets [N] expected");
  TORCH_CHECK(chunk >= 1, "ChunkedCrossEntropySum: chunk must be >= 1");
  const torch::Tensor t = targets.to(hidden.device(), torch::kLong);
  if (torch::GradMode::is_enabled() && hidden.requires_grad()) {
    return ChunkedCrossEntropyFunction::apply(hidden, lm_head.detach(), t, chunk, ignore_index);
  }
  torch::NoGradGuard no_grad;
  torch::Tensor total = torch::zeros({}, hidden.options().dtype(torch::kFloat));
  for (int64_t start = 0; start < hidden.size(0); start += chunk) {
    const int64_t len = std::min(chunk, hidden.size(0) - start);
    total += ChunkLossAndGrad(hidden.narrow(0, start, len), lm_head, t.narrow(0, start, len),
                              ignore_index, false)
                 .first;
  }
  return total;
}

}  // namespace lorad::engine
