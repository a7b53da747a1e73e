#include "engine/lora/lora_applier.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lorad::engine {
namespace {

// The autograd nodes of y.addmm_(h, bt, 1, alpha) and y.baddbmm_(h, bt, 1, alpha) (AddUpdate)
// without their products: the value is y's, backward is PyTorch's, formula for formula
// (derivatives.yaml; mm's operand-layout choice from FunctionsManual's mm_mat1/mat2_backward), so
// the gradients equal the computed update's bit for bit.
torch::Tensor TimesAlpha(const torch::Tensor& t, double alpha) {
  return alpha == 1 ? t : t * alpha;
}

// mm_mat1/mat2_backward's test, verbatim.
bool IsColumnMajor(const torch::Tensor& t) { return t.stride(0) == 1 && t.stride(1) == t.size(0); }

// 2-D (addmm_) or 3-D (baddbmm_, bt expanded over the batch) by the rank of y.
class GraphOnlyUpdateFunction : public torch::autograd::Function<GraphOnlyUpdateFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& y,
                               const torch::Tensor& h, const torch::Tensor& bt, double alpha) {
    ctx->save_for_backward({h, bt});
    ctx->saved_data["alpha"] = alpha;
    return y.view_as(y);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& h = saved[0];
    const torch::Tensor& bt = saved[1];
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const torch::Tensor& g = grads[0];
    torch::Tensor dh;
    torch::Tensor dbt;
    if (g.dim() == 3) {
      dh = g.bmm(bt.transpose(1, 2));
      dbt = h.transpose(1, 2).bmm(g);
    } else {
      dh = IsColumnMajor(h) ? bt.mm(g.t()).t() : g.mm(bt.t());
      dbt = IsColumnMajor(bt) ? g.t().mm(h).t() : h.t().mm(g);
    }
    return {g, TimesAlpha(dh, alpha), TimesAlpha(dbt, alpha), torch::Tensor()};
  }
};

}  // namespace

const char* ProjectionName(Projection projection) {
  switch (projection) {
    case Projection::kQ:
      return "q_proj";
    case Projection::kK:
      return "k_proj";
    case Projection::kV:
      return "v_proj";
    case Projection::kO:
      return "o_proj";
    case Projection::kGate:
      return "gate_proj";
    case Projection::kUp:
      return "up_proj";
    case Projection::kDown:
      return "down_proj";
  }
  return "";
}

std::string ProjectionPath(int64_t layer, Projection projection) {
  const bool attention = static_cast<int>(projection) <= static_cast<int>(Projection::kO);
  return absl::StrCat("model.layers.", layer, attention ? ".self_attn." : ".mlp.",
                      ProjectionName(projection));
}

std::vector<torch::Tensor> LoraApplier::ApplyShared(int64_t layer,
                                                    const std::vector<Projection>& projections,
                                                    const torch::Tensor& x,
                                                    const std::vector<torch::Tensor>& ys) const {
  std::vector<torch::Tensor> out;
  out.reserve(ys.size());
  for (size_t i = 0; i < projections.size() && i < ys.size(); ++i) {
    out.push_back(Apply(layer, projections[i], x, ys[i]));
  }
  return out;
}

SingleLoraApplier::SingleLoraApplier(const LoraAdapter& adapter, int64_t num_layers, bool train)
    : scaling_(adapter.config.scaling()),
      dropout_(adapter.config.dropout),
      train_(train),
      pairs_(static_cast<size_t>(num_layers)) {
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    for (int p = 0; p < kNumProjections; ++p) {
      auto it = adapter.layers.find(ProjectionPath(layer, static_cast<Projection>(p)));
      pairs_[layer][p] = it == adapter.layers.end() ? nullptr : &it->second;
    }
  }
}

torch::Tensor SingleLoraApplier::Apply(int64_t layer, Projection projection, const torch::Tensor& x,
                                       const torch::Tensor& y) const {
  return ApplyOrGraph(layer, projection, x, y, /*value_needed=*/true);
}

torch::Tensor SingleLoraApplier::ApplyOrGraph(int64_t layer, Projection projection,
                                              const torch::Tensor& x, const torch::Tensor& y,
                                              bool value_needed) const {
  const LoraPair* pair = pairs_.at(layer)[static_cast<int>(projection)];
  if (pair == nullptr) return y;
  const auto options = x.options();
  const torch::Tensor a = pair->a.to(options);  // [r, in]; no copy when already right
  const torch::Tensor b = pair->b.to(options);  // [out, r]
  const torch::Tensor dx = train_ && dropout_ > 0 ? torch::dropout(x, dropout_, true) : x;
  // Rank r is small: x A^T first keeps the intermediate [..., r].
  return AddUpdate(y, torch::linear(dx, a), b, value_needed);
}

std::vector<torch::Tensor> SingleLoraApplier::ApplySharedOrGraph(
    int64_t layer, const std::vector<Projection>& projections, const torch::Tensor& x,
    const std::vector<torch::Tensor>& ys, bool value_needed) const {
  std::vector<const LoraPair*> pairs;
  for (const Projection p : projections) pairs.push_back(pairs_.at(layer)[static_cast<int>(p)]);
  const bool all_targeted =
      std::all_of(pairs.begin(), pairs.end(), [](const LoraPair* p) { return p != nullptr; });
  if (pairs.size() < 2 || pairs.size() != ys.size() || !all_targeted || (train_ && dropout_ > 0)) {
    std::vector<torch::Tensor> out;
    for (size_t i = 0; i < projections.size() && i < ys.size(); ++i) {
      out.push_back(ApplyOrGraph(layer, projections[i], x, ys[i], value_needed));
    }
    return out;
  }
  std::vector<torch::Tensor> as;
  std::vector<int64_t> ranks;
  for (const LoraPair* p : pairs) {
    as.push_back(p->a);
    ranks.push_back(p->a.size(0));
  }
  // Stacked in the adapter's dtype, then cast once; autograd splits A's gradient back. The
  // split's backward is one concatenation of the parts' gradients (narrow's would zero-fill and
  // sum a full-width buffer per part).
  const torch::Tensor h_all = torch::linear(x, torch::cat(as, 0).to(x.options()));
  const std::vector<torch::Tensor> hs = h_all.split_with_sizes(ranks, -1);
  std::vector<torch::Tensor> out;
  for (size_t i = 0; i < pairs.size(); ++i) {
    out.push_back(AddUpdate(ys[i], hs[i], pairs[i]->b.to(x.options()), value_needed));
  }
  return out;
}

torch::Tensor SingleLoraApplier::AddUpdate(const torch::Tensor& y, const torch::Tensor& h,
                                           const torch::Tensor& b, bool value_needed) const {
  if (!y.is_contiguous() || y.dim() < 2 || y.dim() > 3) {
    return y + torch::linear(h, b) * scaling_;
  }
  if (!value_needed && torch::GradMode::is_enabled()) {
    return GraphOnlyUpdateFunction::apply(
        y, h, y.dim() == 2 ? b.t() : b.t().expand({y.size(0), -1, -1}), scaling_);
  }
  // One GEMM adds scaling * h B^T into y in place (beta 1, alpha scaling): no [..., out]
  // temporaries for the product, its scaling and the sum, which at 4,096 training tokens are
  // each as large as y. On y itself rather than a view of it, so that autograd needs no copy.
  torch::Tensor out = y;
  if (y.dim() == 2) {
    out.addmm_(h, b.t(), 1, scaling_);
  } else {
    out.baddbmm_(h, b.t().expand({y.size(0), -1, -1}), 1, scaling_);
  }
  return out;
}

}  // namespace lorad::engine
