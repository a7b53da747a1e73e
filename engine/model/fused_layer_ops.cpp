#include "engine/model/fused_layer_ops.h"

#include <atomic>

#include "engine/model/kernel_launch.h"
#include "kernels/layer_ops.h"

namespace lorad::engine {
namespace {

std::atomic<FusedLayerOps> mode{FusedLayerOps::kCuda};

// fp32 or bf16: UseFusedLayerOps admits nothing else.
kernels::FloatKind KindOf(const torch::Tensor& t) { return *FloatKindOf(t.scalar_type()); }

// Whether autograd records an op on these inputs (the fused ops then go through a Function).
bool Records(std::initializer_list<const torch::Tensor*> inputs) {
  if (!torch::GradMode::is_enabled()) return false;
  for (const torch::Tensor* t : inputs) {
    if (t->requires_grad()) return true;
  }
  return false;
}

torch::Tensor RmsNormKernel(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const torch::Tensor xc = x.contiguous();
  const torch::Tensor w = weight.to(x.scalar_type()).contiguous();
  torch::Tensor out = torch::empty_like(xc);
  const int64_t width = x.size(-1);
  const int64_t rows = xc.numel() / width;
  const auto e = static_cast<float>(eps);
  RunKernel(
      xc, "rms_norm_cuda",
      [&] {
        kernels::rms_norm_cpu(xc.data_ptr(), w.data_ptr(), KindOf(xc), rows, width, e,
                              out.data_ptr());
      },
      [&](void* stream) {
        return kernels::rms_norm_cuda(xc.data_ptr(), w.data_ptr(), KindOf(xc), rows, width, e,
                                      out.data_ptr(), stream);
      });
  return out;
}

std::pair<torch::Tensor, torch::Tensor> AddRmsNormKernel(const torch::Tensor& x,
                                                         const torch::Tensor& delta,
                                                         const torch::Tensor& weight, double eps) {
  const torch::Tensor xc = x.contiguous();
  const torch::Tensor dc = delta.to(x.scalar_type()).contiguous();
  const torch::Tensor w = weight.to(x.scalar_type()).contiguous();
  torch::Tensor sum = torch::empty_like(xc);
  torch::Tensor out = torch::empty_like(xc);
  const int64_t width = x.size(-1);
  const int64_t rows = xc.numel() / width;
  const auto e = static_cast<float>(eps);
  RunKernel(
      xc, "add_rms_norm_cuda",
      [&] {
        kernels::add_rms_norm_cpu(xc.data_ptr(), dc.data_ptr(), w.data_ptr(), KindOf(xc), rows,
                                  width, e, sum.data_ptr(), out.data_ptr());
      },
      [&](void* stream) {
        return kernels::add_rms_norm_cuda(xc.data_ptr(), dc.data_ptr(), w.data_ptr(), KindOf(xc),
                                          rows, width, e, sum.data_ptr(), out.data_ptr(), stream);
      });
  return {sum, out};
}

torch::Tensor RmsNormBackwardKernel(const torch::Tensor& x, const torch::Tensor& weight,
                                    const torch::Tensor& dy, double eps) {
  const torch::Tensor xc = x.contiguous();
  const torch::Tensor w = weight.to(x.scalar_type()).contiguous();
  const torch::Tensor g = dy.to(x.scalar_type()).contiguous();
  torch::Tensor dx = torch::empty_like(xc);
  const int64_t width = x.size(-1);
  const int64_t rows = xc.numel() / width;
  const auto e = static_cast<float>(eps);
  RunKernel(
      xc, "rms_norm_backward_cuda",
      [&] {
        kernels::rms_norm_backward_cpu(xc.data_ptr(), w.data_ptr(), g.data_ptr(), KindOf(xc), rows,
                                       width, e, dx.data_ptr());
      },
      [&](void* stream) {
        return kernels::rms_norm_backward_cuda(xc.data_ptr(), w.data_ptr(), g.data_ptr(),
                                               KindOf(xc), rows, width, e, dx.data_ptr(), stream);
      });
  return dx;
}

torch::Tensor RotaryKernel(const torch::Tensor& x, const torch::Tensor& cos,
                           const torch::Tensor& sin) {
  const torch::Tensor xc = x.contiguous();
  const torch::Tensor c = cos.to(x.scalar_type()).contiguous();
  const torch::Tensor s = sin.to(x.scalar_type()).contiguous();
  torch::Tensor out = torch::empty_like(xc);
  const int64_t rows = x.size(0) * x.size(1);
  RunKernel(
      xc, "rotary_cuda",
      [&] {
        kernels::rotary_cpu(xc.data_ptr(), c.data_ptr(), s.data_ptr(), KindOf(xc), rows, x.size(2),
                            x.size(3), out.data_ptr());
      },
      [&](void* stream) {
        return kernels::rotary_cuda(xc.data_ptr(), c.data_ptr(), s.data_ptr(), KindOf(xc), rows,
                                    x.size(2), x.size(3), out.data_ptr(), stream);
      });
  return out;
}

torch::Tensor SiluMulKernel(const torch::Tensor& gate, const torch::Tensor& up) {
  const torch::Tensor g = gate.contiguous();
  const torch::Tensor u = up.to(gate.scalar_type()).contiguous();
  torch::Tensor out = torch::empty_like(g);
  RunKernel(
      g, "silu_mul_cuda",
      [&] {
        kernels::silu_mul_cpu(g.data_ptr(), u.data_ptr(), KindOf(g), g.numel(), out.data_ptr());
      },
      [&](void* stream) {
        return kernels::silu_mul_cuda(g.data_ptr(), u.data_ptr(), KindOf(g), g.numel(),
                                      out.data_ptr(), stream);
      });
  return out;
}

std::pair<torch::Tensor, torch::Tensor> SiluMulBackwardKernel(const torch::Tensor& gate,
                                                              const torch::Tensor& up,
                                                              const torch::Tensor& dy) {
  const torch::Tensor g = gate.contiguous();
  const torch::Tensor u = up.to(gate.scalar_type()).contiguous();
  const torch::Tensor d = dy.to(gate.scalar_type()).contiguous();
  torch::Tensor d_gate = torch::empty_like(g);
  torch::Tensor d_up = torch::empty_like(g);
  RunKernel(
      g, "silu_mul_backward_cuda",
      [&] {
        kernels::silu_mul_backward_cpu(g.data_ptr(), u.data_ptr(), d.data_ptr(), KindOf(g),
                                       g.numel(), d_gate.data_ptr(), d_up.data_ptr());
      },
      [&](void* stream) {
        return kernels::silu_mul_backward_cuda(g.data_ptr(), u.data_ptr(), d.data_ptr(), KindOf(g),
                                               g.numel(), d_gate.data_ptr(), d_up.data_ptr(),
                                               stream);
      });
  return {d_gate, d_up};
}

// The autograd Functions of the fused ops: the layer's weights (norm weights, cos and sin) are
// frozen, so each returns the gradient of its activation inputs only.
class RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, double eps) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["eps"] = eps;
    return RmsNormKernel(x, weight, eps);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {RmsNormBackwardKernel(saved[0], saved[1], grads[0], ctx->saved_data["eps"].toDouble()),
            torch::Tensor(), torch::Tensor()};
  }
};

// The residual add and the norm of the sum: one kernel forward (not the add, then the norm),
// and backward d(sum) + the norm's backward for both inputs (the add's gradient is the identity).
class AddRmsNormFunction : public torch::autograd::Function<AddRmsNormFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const torch::Tensor& x, const torch::Tensor& delta,
                                                const torch::Tensor& weight, double eps) {
    auto [sum, normed] = AddRmsNormKernel(x, delta, weight, eps);
    ctx->save_for_backward({sum, weight});
    ctx->saved_data["eps"] = eps;
    return {sum, normed};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& d_sum = grads[0];
    const torch::Tensor& d_normed = grads[1];
    torch::Tensor d;
    if (d_normed.defined()) {
      d = RmsNormBackwardKernel(saved[0], saved[1], d_normed, ctx->saved_data["eps"].toDouble());
      if (d_sum.defined()) d.add_(d_sum.to(d.scalar_type()));
    } else {
      d = d_sum;
    }
    return {d, d, torch::Tensor(), torch::Tensor()};
  }
};

class RotaryFunction : public torch::autograd::Function<RotaryFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& cos, const torch::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    return RotaryKernel(x, cos, sin);
  }

  // The rotation's transpose is the rotation by -angle (kernels/layer_ops.h).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {RotaryKernel(grads[0], saved[0], saved[1].neg()), torch::Tensor(), torch::Tensor()};
  }
};

class SiluMulFunction : public torch::autograd::Function<SiluMulFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& gate,
                               const torch::Tensor& up) {
    ctx->save_for_backward({gate, up});
    return SiluMulKernel(gate, up);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [d_gate, d_up] = SiluMulBackwardKernel(saved[0], saved[1], grads[0]);
    return {d_gate, d_up};
  }
};

}  // namespace

bool UseFusedLayerOps(const torch::Tensor& x) {
  const FusedLayerOps m = mode.load(std::memory_order_relaxed);
#if defined(LORAD_WITH_CUDA)
  const bool device = x.is_cuda() || (x.is_cpu() && m == FusedLayerOps::kAlsoOnCpu);
#else
  const bool device = x.is_cpu() && m == FusedLayerOps::kAlsoOnCpu;
#endif
  return m != FusedLayerOps::kOff && device &&
         (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16);
}

void SetFusedLayerOps(FusedLayerOps m) { mode.store(m); }

torch::Tensor FusedRmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(!weight.requires_grad(), "FusedRmsNorm: the norm weight must be frozen");
  return Records({&x}) ? RmsNormFunction::apply(x, weight, eps) : RmsNormKernel(x, weight, eps);
}

std::pair<torch::Tensor, torch::Tensor> FusedAddRmsNorm(const torch::Tensor& x,
                                                        const torch::Tensor& delta,
                                                        const torch::Tensor& weight, double eps) {
  TORCH_CHECK(!weight.requires_grad(), "FusedAddRmsNorm: the norm weight must be frozen");
  TORCH_CHECK(x.sizes() == delta.sizes(), "FusedAddRmsNorm: x and delta differ in shape");
  if (Records({&x, &delta})) {
    const torch::autograd::variable_list out = AddRmsNormFunction::apply(x, delta, weight, eps);
    return {out[0], out[1]};
  }
  return AddRmsNormKernel(x, delta, weight, eps);
}

torch::Tensor FusedRotary(const torch::Tensor& x, const torch::Tensor& cos,
                          const torch::Tensor& sin) {
  return Records({&x}) ? RotaryFunction::apply(x, cos, sin) : RotaryKernel(x, cos, sin);
}

torch::Tensor FusedSiluMul(const torch::Tensor& gate, const torch::Tensor& up) {
  return Records({&gate, &up}) ? SiluMulFunction::apply(gate, up) : SiluMulKernel(gate, up);
}

}  // namespace lorad::engine
