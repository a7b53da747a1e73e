#include "engine/model/base_linear.h"

#include <string>
#include <vector>

#include "engine/model/checkpointed_call.h"

namespace lorad::engine {
namespace {

// y_i = x W_i^T for one or several NF4 weights on one x (q, k, v; gate, up) under autograd. Saves
// the (shared, immutable) quantized weights; backward dequantizes again, dx = sum_i dy_i W_i,
// accumulated by the GEMMs themselves (one product, then one accumulating product per further
// weight, not an add kernel each), except in a checkpointed layer's recompute, whose backward
// follows at once: there the forward keeps its dequantized weights for it (one dequantization
// fewer per projection and step, for one layer's weights in 16-bit at a time). Without
// `value_needed` nothing is computed: the outputs are uninitialized (BaseLinear::ForwardGraphOnly).
class Nf4GroupLinearFunction : public torch::autograd::Function<Nf4GroupLinearFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const torch::Tensor& x,
                                                const std::vector<const Nf4Tensor*>& weights,
                                                bool value_needed) {
    std::vector<int64_t> pointers;
    const bool keep = InCheckpointRecompute();
    torch::autograd::variable_list ys;
    for (size_t i = 0; i < weights.size(); ++i) {
      pointers.push_back(reinterpret_cast<int64_t>(weights[i]));
      if (!value_needed) {
        std::vector<int64_t> sizes = x.sizes().vec();
        sizes.back() = weights[i]->out_features();
        ys.push_back(torch::empty(sizes, x.options()));
        continue;
      }
      if (!keep) {
        ys.push_back(weights[i]->Linear(x));
        continue;
      }
      const torch::Tensor w = weights[i]->Dequantize(x.scalar_type());
      ctx->saved_data["dequantized" + std::to_string(i)] = w;
      ys.push_back(torch::matmul(x, w.t()));
    }
    ctx->saved_data["weights"] = pointers;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    return ys;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const std::vector<int64_t> pointers = ctx->saved_data["weights"].toIntVector();
    torch::Tensor dx;  // [rows, in]
    for (size_t i = 0; i < pointers.size(); ++i) {
      if (!grads[i].defined()) continue;
      const torch::Tensor& dy = grads[i];
      torch::Tensor w;
      const std::string key = "dequantized" + std::to_string(i);
      if (auto it = ctx->saved_data.find(key); it != ctx->saved_data.end()) {
        w = it->second.toTensor().to(dy.scalar_type());
        ctx->saved_data.erase(it);  // free it now, not with the graph
      } else {
        w = reinterpret_cast<const Nf4Tensor*>(pointers[i])->Dequantize(dy.scalar_type());
      }
      const torch::Tensor dy2 = dy.reshape({-1, dy.size(-1)});
      if (!dx.defined()) {
        dx = dy2.mm(w);
      } else {
        dx.addmm_(dy2, w);
      }
    }
    if (dx.defined()) dx = dx.view(ctx->saved_data["x_sizes"].toIntVector());
    return {dx, torch::Tensor(), torch::Tensor()};
  }
};

// A product whose value is never read: forward leaves the result uninitialized and records only
// what backward needs, dx = dy W (see BaseLinear::ForwardGraphOnly).
class GraphOnlyLinearFunction : public torch::autograd::Function<GraphOnlyLinearFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const BaseLinear* linear) {
    ctx->saved_data["linear"] = reinterpret_cast<int64_t>(linear);
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = linear->out_features();
    return torch::empty(sizes, x.options());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::Tensor& dy = grads[0];
    const auto* linear = reinterpret_cast<const BaseLinear*>(ctx->saved_data["linear"].toInt());
    return {torch::matmul(dy, linear->DenseWeight(dy.scalar_type())), torch::Tensor()};
  }
};

}  // namespace

BaseLinear BaseLinear::Float(torch::Tensor weight, torch::Tensor bias) {
  BaseLinear l;
  l.weight_ = std::move(weight);
  l.bias_ = std::move(bias);
  return l;
}

BaseLinear BaseLinear::Nf4(Nf4Tensor weight, torch::Tensor bias) {
  BaseLinear l;
  l.nf4_ = std::move(weight);
  l.bias_ = std::move(bias);
  return l;
}

torch::Tensor BaseLinear::Forward(const torch::Tensor& x) const {
  if (!nf4_) return torch::linear(x, weight_, bias_);
  // Only record the custom backward when a gradient is wanted; otherwise the plain call lets
  // Nf4Tensor::Linear pick its GEMV kernel.
  torch::Tensor y =
      torch::GradMode::is_enabled() && x.requires_grad()
          ? Nf4GroupLinearFunction::apply(x, std::vector<const Nf4Tensor*>{&*nf4_}, true)[0]
          : nf4_->Linear(x);
  return bias_.defined() ? y + bias_ : y;
}

torch::Tensor BaseLinear::ForwardGraphOnly(const torch::Tensor& x) const {
  if (!torch::GradMode::is_enabled() || !x.requires_grad()) return Forward(x);
  TORCH_CHECK(x.size(-1) == in_features(), "BaseLinear: input has ", x.size(-1),
              " features, the weight expects ", in_features());
  return GraphOnlyLinearFunction::apply(x, this);
}

std::vector<torch::Tensor> BaseLinear::ForwardShared(const std::vector<const BaseLinear*>& linears,
                                                     const torch::Tensor& x, bool value_needed) {
  const bool records = torch::GradMode::is_enabled() && x.requires_grad();
  std::vector<const Nf4Tensor*> weights;
  for (const BaseLinear* l : linears) {
    if (l->nf4_) weights.push_back(&*l->nf4_);
  }
  std::vector<torch::Tensor> ys;
  if (weights.size() != linears.size()) {
    for (const BaseLinear* l : linears) {
      ys.push_back(value_needed ? l->Forward(x) : l->ForwardGraphOnly(x));
    }
    return ys;
  }
  ys = records ? Nf4GroupLinearFunction::apply(x, weights, value_needed)
               : Nf4Tensor::LinearGroup(weights, x);
  for (size_t i = 0; i < ys.size(); ++i) {
    if (linears[i]->bias_.defined()) ys[i] = ys[i] + linears[i]->bias_;
  }
  return ys;
}

torch::Tensor BaseLinear::SiluMulShared(const BaseLinear& gate, const BaseLinear& up,
                                        const torch::Tensor& x) {
  if (!gate.nf4_ || !up.nf4_ || gate.bias_.defined() || up.bias_.defined()) return {};
  return Nf4Tensor::SiluMulProduct(*gate.nf4_, *up.nf4_, x);
}

torch::Tensor BaseLinear::DenseWeight(torch::ScalarType dtype) const {
  return nf4_ ? nf4_->Dequantize(dtype) : weight_.to(dtype);
}

int64_t BaseLinear::in_features() const { return nf4_ ? nf4_->in_features() : weight_.size(1); }

int64_t BaseLinear::out_features() const { return nf4_ ? nf4_->out_features() : weight_.size(0); }

std::vector<torch::Tensor> BaseLinear::tensors() const {
  std::vector<torch::Tensor> out;
  if (nf4_) {
    out = {nf4_->packed, nf4_->qabsmax, nf4_->absmax2, nf4_->code2};
  } else {
    out = {weight_};
  }
  if (bias_.defined()) out.push_back(bias_);
  return out;
}

int64_t BaseLinear::bytes() const {
  int64_t n = nf4_ ? nf4_->bytes() : static_cast<int64_t>(weight_.nbytes());
  if (bias_.defined()) n += static_cast<int64_t>(bias_.nbytes());
  return n;
}

}  // namespace lorad::engine
