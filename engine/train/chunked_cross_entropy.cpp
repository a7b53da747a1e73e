#include "engine/train/chunked_cross_entropy.h"

#include <algorithm>

#include "engine/model/kernel_launch.h"
#include "kernels/cross_entropy.h"

namespace lorad::engine {
namespace {

// Loss and d(loss)/d(hidden) of one chunk. h [n, H], targets [n] (-1: ignored). The loss rows and
// the gradient of the logits come from one kernel (kernels/cross_entropy.h) on the logits as the
// lm_head product left them (fp32 or bf16).
std::pair<torch::Tensor, torch::Tensor> ChunkLossAndGrad(const torch::Tensor& h,
                                                         const torch::Tensor& w,
                                                         const torch::Tensor& targets,
                                                         bool want_grad) {
  torch::Tensor logits = torch::linear(h, w);  // [n, V]
  if (logits.scalar_type() != torch::kFloat && logits.scalar_type() != torch::kBFloat16) {
    logits = logits.to(torch::kFloat);
  }
  logits = logits.contiguous();
  const torch::Tensor t = targets.contiguous();
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  const kernels::FloatKind kind = *FloatKindOf(logits.scalar_type());
  torch::Tensor loss_rows = torch::empty({rows}, logits.options().dtype(torch::kFloat));
  torch::Tensor grad = want_grad ? torch::empty_like(logits) : torch::Tensor();
  void* grad_ptr = want_grad ? grad.data_ptr() : nullptr;
  RunKernel(
      logits, "cross_entropy_rows_cuda",
      [&] {
        kernels::cross_entropy_rows_cpu(logits.data_ptr(), kind, t.data_ptr<int64_t>(), rows, vocab,
                                        loss_rows.data_ptr<float>(), grad_ptr);
      },
      [&](void* stream) {
        return kernels::cross_entropy_rows_cuda(logits.data_ptr(), kind, t.data_ptr<int64_t>(),
                                                rows, vocab, loss_rows.data_ptr<float>(), grad_ptr,
                                                stream);
      });
  const torch::Tensor loss = loss_rows.sum();
  if (!want_grad) return {loss, torch::Tensor()};
  return {loss, torch::matmul(grad.to(h.scalar_type()), w)};  // [n, H]
}

class ChunkedCrossEntropyFunction : public torch::autograd::Function<ChunkedCrossEntropyFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& hidden,
                               const torch::Tensor& lm_head, const torch::Tensor& targets,
                               int64_t chunk) {
    const int64_t n = hidden.size(0);
    torch::Tensor total = torch::zeros({}, hidden.options().dtype(torch::kFloat));
    torch::Tensor grad = torch::empty_like(hidden);
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t len = std::min(chunk, n - start);
      auto [loss, g] = ChunkLossAndGrad(hidden.narrow(0, start, len), lm_head,
                                        targets.narrow(0, start, len), true);
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
            torch::Tensor()};
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
  // The kernel would skip a target outside the vocabulary as if ignored: refuse it instead. The
  // check runs where the targets are: on the host (the trainer's) it need not wait for the
  // forward queued on the device, and the copy after it does not wait either.
  torch::Tensor t = targets.to(torch::kLong);
  const int64_t vocab = lm_head.size(0);
  const torch::Tensor ignored = t == ignore_index;
  TORCH_CHECK((ignored | ((t >= 0) & (t < vocab))).all().item<bool>(),
              "ChunkedCrossEntropySum: a target is outside the vocabulary [0, ", vocab,
              ") and is not the ignored label ", ignore_index);
  t = torch::where(ignored, torch::full_like(t, -1), t)  // what the kernel skips
          .to(hidden.device(), torch::kLong, /*non_blocking=*/true);
  if (torch::GradMode::is_enabled() && hidden.requires_grad()) {
    return ChunkedCrossEntropyFunction::apply(hidden, lm_head.detach(), t, chunk);
  }
  torch::NoGradGuard no_grad;
  torch::Tensor total = torch::zeros({}, hidden.options().dtype(torch::kFloat));
  for (int64_t start = 0; start < hidden.size(0); start += chunk) {
    const int64_t len = std::min(chunk, hidden.size(0) - start);
    total += ChunkLossAndGrad(hidden.narrow(0, start, len), lm_head, t.narrow(0, start, len), false)
                 .first;
  }
  return total;
}

}  // namespace lorad::engine
