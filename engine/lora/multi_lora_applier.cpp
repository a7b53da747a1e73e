#include "engine/lora/multi_lora_applier.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lorad::engine {

absl::StatusOr<std::shared_ptr<const LoraStack>> LoraStack::Build(
    const std::vector<const LoraAdapter*>& adapters, int64_t num_layers, torch::Device device,
    torch::ScalarType dtype) {
  auto stack = std::make_shared<LoraStack>();
  const int64_t slots = static_cast<int64_t>(adapters.size()) + 1;
  stack->num_adapters_ = static_cast<int32_t>(adapters.size());
  stack->entries_.resize(static_cast<size_t>(num_layers));
  const auto options = torch::TensorOptions().dtype(dtype).device(device);
  try {
    torch::NoGradGuard no_grad;
    for (int64_t layer = 0; layer < num_layers; ++layer) {
      for (int p = 0; p < kNumProjections; ++p) {
        const std::string path = ProjectionPath(layer, static_cast<Projection>(p));
        std::vector<const LoraPair*> pairs(adapters.size(), nullptr);
        int64_t r_max = 0, in = 0, out = 0;
        for (size_t i = 0; i < adapters.size(); ++i) {
          auto it = adapters[i]->layers.find(path);
          if (it == adapters[i]->layers.end()) continue;
          pairs[i] = &it->second;
          r_max = std::max<int64_t>(r_max, it->second.a.size(0));
          const int64_t pin = it->second.a.size(1), pout = it->second.b.size(0);
          if ((in != 0 && in != pin) || (out != 0 && out != pout)) {
            return absl::InvalidArgumentError(
                absl::StrCat("adapters disagree on the shape of ", path, ": [", out, ", ", in,
                             "] and [", pout, ", ", pin, "]"));
          }
          in = pin;
          out = pout;
        }
        if (r_max == 0) continue;  // no adapter targets this projection
        Entry& e = stack->entries_[layer][p];
        e.a = torch::zeros({slots, r_max, in}, options);
        e.b = torch::zeros({slots, out, r_max}, options);
        std::vector<float> scale(static_cast<size_t>(slots), 0.0f);
        for (size_t i = 0; i < pairs.size(); ++i) {
          if (pairs[i] == nullptr) continue;
          const int64_t r = pairs[i]->a.size(0);
          e.a[static_cast<int64_t>(i)].narrow(0, 0, r).copy_(pairs[i]->a);
          e.b[static_cast<int64_t>(i)].narrow(1, 0, r).copy_(pairs[i]->b);
          scale[i] = static_cast<float>(adapters[i]->config.scaling());
        }
        e.scale = torch::tensor(scale).to(options);
      }
    }
  } catch (const c10::Error& e) {
    return absl::ResourceExhaustedError(absl::StrCat("stacking ", adapters.size(),
                                                     " LoRA adapters on ", device.str(), ": ",
                                                     e.what_without_backtrace()));
  }
  return std::shared_ptr<const LoraStack>(std::move(stack));
}

int64_t LoraStack::bytes() const {
  int64_t n = 0;
  for (const auto& layer : entries_) {
    for (const Entry& e : layer) {
      if (e.a.defined()) n += static_cast<int64_t>(e.a.nbytes() + e.b.nbytes() + e.scale.nbytes());
    }
  }
  return n;
}

MultiLoraApplier::MultiLoraApplier(std::shared_ptr<const LoraStack> stack,
                                   const std::vector<int32_t>& row_slots, torch::Device device)
    : stack_(std::move(stack)) {
  std::vector<int64_t> rows;
  rows.reserve(row_slots.size());
  for (int32_t s : row_slots) rows.push_back(s < 0 ? stack_->none_slot() : s);
  rows_ = torch::tensor(rows, torch::kLong).to(device);
}

torch::Tensor MultiLoraApplier::Apply(int64_t layer, Projection projection, const torch::Tensor& x,
                                      const torch::Tensor& y) const {
  const LoraStack::Entry& e = stack_->entry(layer, projection);
  if (!e.a.defined()) return y;
  const int64_t rows = x.size(0);
  const torch::Tensor x3 = x.reshape({rows, -1, x.size(-1)});                      // [B, T, in]
  const torch::Tensor a = e.a.index_select(0, rows_).to(x.scalar_type());          // [B, r, in]
  const torch::Tensor b = e.b.index_select(0, rows_).to(x.scalar_type());          // [B, out, r]
  const torch::Tensor scale = e.scale.index_select(0, rows_).to(x.scalar_type());  // [B]
  // Rank first, as PEFT does: the intermediate is [B, T, r].
  const torch::Tensor h = torch::bmm(x3, a.transpose(1, 2));
  const torch::Tensor delta = torch::bmm(h, b.transpose(1, 2)) * scale.view({rows, 1, 1});
  return y + delta.view(y.sizes());
}

}  // namespace lorad::engine
