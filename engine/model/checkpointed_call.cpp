#include "engine/model/checkpointed_call.h"

#include <ATen/core/ivalue.h>
#include <torch/custom_class.h>

#include <mutex>
#include <optional>

#include "engine/runtime/random_state.h"

namespace lorad::engine {
namespace {

thread_local int recomputing = 0;  // CheckpointFunction::backward calls in their recompute

// Marks this thread as recomputing while it lives (InCheckpointRecompute).
struct RecomputeScope {
  RecomputeScope() { ++recomputing; }
  ~RecomputeScope() { --recomputing; }
  RecomputeScope(const RecomputeScope&) = delete;
  RecomputeScope& operator=(const RecomputeScope&) = delete;
};

// What backward needs, kept alive by the autograd node (a capsule in saved_data).
struct Saved : torch::CustomClassHolder {
  CheckpointedFn fn;
  RandomState rng;
  torch::Tensor offloaded;  // the input in pinned host memory, when offloading
  torch::Device device = torch::kCPU;
};

class CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               CheckpointedFn fn, bool offload) {
    auto saved = c10::make_intrusive<Saved>();
    saved->rng = RandomState::Capture(x.is_cuda());
    saved->fn = std::move(fn);
    saved->device = x.device();
    if (offload && x.is_cuda()) {
      saved->offloaded =
          torch::empty(x.sizes(), x.options().device(torch::kCPU).pinned_memory(true));
      saved->offloaded.copy_(x.detach(), /*non_blocking=*/true);
      ctx->save_for_backward({});
    } else {
      ctx->save_for_backward({x});
    }
    torch::Tensor y;
    {
      torch::NoGradGuard no_grad;
      y = saved->fn(x);
    }
    ctx->saved_data["saved"] = c10::IValue::make_capsule(std::move(saved));
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved =
        c10::static_intrusive_pointer_cast<Saved>(ctx->saved_data["saved"].toCapsule());
    const torch::Tensor x =
        (saved->offloaded.defined() ? saved->offloaded.to(saved->device, /*non_blocking=*/true)
                                    : ctx->get_saved_variables()[0].detach())
            .requires_grad_(true);
    // Replay the forward's random draws, then put the generators back where backward found them.
    const RandomState now = RandomState::Capture(x.is_cuda());
    saved->rng.Restore();
    torch::Tensor y;
    {
      torch::AutoGradMode grad(true);
      const RecomputeScope recompute;
      y = saved->fn(x);
    }
    now.Restore();
    torch::autograd::backward({y}, {grads[0]});
    return {x.grad(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

bool InCheckpointRecompute() { return recomputing > 0; }

torch::Tensor CheckpointedCall(CheckpointedFn fn, const torch::Tensor& x, bool offload) {
  return CheckpointFunction::apply(x, std::move(fn), offload);
}

}  // namespace lorad::engine
