#include "engine/lora/multi_lora_applier.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/model/kernel_launch.h"

#if defined(LORAD_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>

#include "kernels/lora_bgmv.h"
#endif

namespace lorad::engine {

absl::StatusOr<std::shared_ptr<const LoraStack>> LoraStack::Build(
    const std::vector<const LoraAdapter*>& adapters, int64_t num_layers, torch::Device device,
    torch::ScalarType dtype) {
  auto stack = std::make_shared<LoraStack>();
  const int64_t n = static_cast<int64_t>(adapters.size());
  stack->num_adapters_ = static_cast<int32_t>(n);
  stack->dtype_ = dtype;
  stack->entries_.resize(static_cast<size_t>(num_layers));
  // Every entry's kernel tables (pointer, rank and scale arrays) are gathered on the host and go
  // to the device in one copy per kind, each entry a view of them: a copy per table and entry
  // (four for each of 224 entries of an 8B model) each waited for the stream, and a request on an
  // adapter that found the engine idle waited for all of them before its first token.
  std::vector<Entry*> entries;
  std::vector<int64_t> pointers;  // per entry: a[0..n), then b[0..n)
  std::vector<int32_t> ranks;     // per entry: [n]
  std::vector<float> scales;      // per entry: [n]
  try {
    torch::NoGradGuard no_grad;
    // The adapter's own tensor where the kernels and the torch path can read it as it is (the
    // store's device copies are), else a copy the stack owns.
    const auto on_device = [&](const torch::Tensor& t) {
      torch::Tensor out = t.detach().to(device, dtype).contiguous();
      if (out.data_ptr() != t.data_ptr()) stack->own_bytes_ += static_cast<int64_t>(out.nbytes());
      return out;
    };
    for (int64_t layer = 0; layer < num_layers; ++layer) {
      for (int p = 0; p < kNumProjections; ++p) {
        const std::string path = ProjectionPath(layer, static_cast<Projection>(p));
        Entry e;
        e.a.resize(adapters.size());
        e.b.resize(adapters.size());
        e.scale.assign(adapters.size(), 0.0f);
        int64_t& in = e.in_features;
        int64_t& out = e.out_features;
        for (size_t i = 0; i < adapters.size(); ++i) {
          auto it = adapters[i]->layers.find(path);
          if (it == adapters[i]->layers.end()) continue;
          const LoraPair& pair = it->second;
          const int64_t pin = pair.a.size(1), pout = pair.b.size(0);
          if ((in != 0 && in != pin) || (out != 0 && out != pout)) {
            return absl::InvalidArgumentError(absl::StrCat("adapters disagree on the shape of ",
                                                           path, ": [", out, ", ", in, "] and [",
                                                           pout, ", ", pin, "]"));
          }
          in = pin;
          out = pout;
          e.a[i] = on_device(pair.a);
          e.b[i] = on_device(pair.b);
          e.scale[i] = static_cast<float>(adapters[i]->config.scaling());
          e.max_rank = std::max<int32_t>(e.max_rank, static_cast<int32_t>(pair.a.size(0)));
        }
        if (!e.targeted()) continue;  // no adapter targets this projection
        std::vector<int64_t> b_pointers;
        for (size_t i = 0; i < adapters.size(); ++i) {
          const bool has = e.a[i].defined();
          pointers.push_back(has ? reinterpret_cast<int64_t>(e.a[i].data_ptr()) : 0);
          b_pointers.push_back(has ? reinterpret_cast<int64_t>(e.b[i].data_ptr()) : 0);
          ranks.push_back(has ? static_cast<int32_t>(e.a[i].size(0)) : 0);
          scales.push_back(e.scale[i]);
        }
        pointers.insert(pointers.end(), b_pointers.begin(), b_pointers.end());
        Entry& kept = stack->entries_[layer][p];
        kept = std::move(e);
        entries.push_back(&kept);
      }
    }
    // Owned host tensors (on the CPU, .to(device) returns them as they are).
    const auto upload = [&](const auto& values, torch::ScalarType type) {
      torch::Tensor host = torch::empty({static_cast<int64_t>(values.size())}, type);
      if (!values.empty()) {
        std::memcpy(host.data_ptr(), values.data(), values.size() * sizeof(values[0]));
      }
      torch::Tensor table = host.to(device);
      stack->own_bytes_ += static_cast<int64_t>(table.nbytes());
      return table;
    };
    // The kernels' tables are built on every device (on the CPU they are a few bytes), so that
    // the CPU tests check them too.
    const torch::Tensor all_scales = upload(scales, torch::kFloat);
    const torch::Tensor all_pointers = upload(pointers, torch::kLong);
    const torch::Tensor all_ranks = upload(ranks, torch::kInt);
    for (size_t k = 0; k < entries.size(); ++k) {
      Entry& e = *entries[k];
      const int64_t at = static_cast<int64_t>(k);
      e.scales_f32 = all_scales.narrow(0, n * at, n);
      e.a_pointers = all_pointers.narrow(0, 2 * n * at, n);
      e.b_pointers = all_pointers.narrow(0, 2 * n * at + n, n);
      e.ranks = all_ranks.narrow(0, n * at, n);
    }
  } catch (const c10::Error& e) {
    return absl::ResourceExhaustedError(absl::StrCat("stacking ", adapters.size(),
                                                     " LoRA adapters on ", device.str(), ": ",
                                                     e.what_without_backtrace()));
  }
  return std::shared_ptr<const LoraStack>(std::move(stack));
}

MultiLoraApplier::MultiLoraApplier(std::shared_ptr<const LoraStack> stack,
                                   const std::vector<int32_t>& row_slots, torch::Device device)
    : stack_(std::move(stack)) {
  std::vector<int32_t> rows;
  rows.reserve(row_slots.size());
  for (int32_t s : row_slots) {
    const bool none = s < 0 || s >= stack_->num_adapters();
    rows.push_back(none ? stack_->none_slot() : s);
  }
  rows_ = torch::tensor(rows, torch::kInt).to(device);
  if (!rows.empty() &&
      std::all_of(rows.begin(), rows.end(), [&](int32_t s) { return s == rows.front(); })) {
    uniform_slot_ = rows.front();  // the none slot: a part of base-model rows, no delta at all
  }
}

MultiLoraApplier::MultiLoraApplier(std::shared_ptr<const LoraStack> stack, torch::Tensor row_slots)
    : stack_(std::move(stack)), rows_(std::move(row_slots)) {}

bool MultiLoraApplier::AddOnDevice(int64_t layer, const std::vector<Projection>& projections,
                                   const torch::Tensor& x,
                                   const std::vector<torch::Tensor>& ys) const {
#if defined(LORAD_WITH_CUDA)
  // Decode rows (one token each) only: BGMV adds each row's own adapter in place, reading only
  // the adapters in use, for all the projections of x in one launch pair.
  const int64_t rows = x.size(0);
  if (!x.is_cuda() || x.numel() != rows * x.size(-1) ||
      (x.scalar_type() != torch::kBFloat16 && x.scalar_type() != torch::kFloat) ||
      projections.size() > static_cast<size_t>(kernels::kMaxLoraTargets) ||
      projections.size() != ys.size()) {
    return false;
  }
  std::vector<kernels::LoraTarget> targets;
  int64_t total_rank = 0;
  for (size_t i = 0; i < projections.size(); ++i) {
    const LoraStack::Entry& e = stack_->entry(layer, projections[i]);
    if (!e.targeted()) continue;  // no adapter targets this projection
    const torch::Tensor& y = ys[i];
    if (!e.a_pointers.defined() || !e.a_pointers.is_cuda() || stack_->dtype() != x.scalar_type() ||
        y.scalar_type() != x.scalar_type() || !y.is_contiguous() || !y.is_cuda()) {
      return false;  // checked for all before any launch: the torch path takes them all
    }
    kernels::LoraTarget& t = targets.emplace_back();
    t.table.a = reinterpret_cast<const void* const*>(e.a_pointers.data_ptr<int64_t>());
    t.table.b = reinterpret_cast<const void* const*>(e.b_pointers.data_ptr<int64_t>());
    t.table.rank = e.ranks.data_ptr<int32_t>();
    t.table.scale = e.scales_f32.data_ptr<float>();
    t.table.num_slots = stack_->num_adapters();
    t.table.max_rank = e.max_rank;
    t.out_features = y.size(-1);
    t.y = y.data_ptr();
    total_rank += t.table.max_rank;
  }
  if (targets.empty()) return true;
  const c10::cuda::CUDAGuard guard(x.device());
  const torch::Tensor xc = x.contiguous();
  const int64_t in_features = x.size(-1);
  const torch::Tensor scratch =
      torch::empty({(kernels::lora_scratch_bytes(rows, in_features, total_rank) + 3) / 4},
                   x.options().dtype(torch::kFloat));
  CheckLaunch(kernels::lora_bgmv_group_cuda(xc.data_ptr(), *FloatKindOf(x.scalar_type()), rows,
                                            in_features, rows_.data_ptr<int32_t>(), targets.data(),
                                            static_cast<int>(targets.size()), scratch.data_ptr(),
                                            CurrentStream(x.device())),
              "lora_bgmv_group_cuda");
  return true;
#else
  (void)layer, (void)projections, (void)x, (void)ys;
  return false;
#endif
}

std::vector<torch::Tensor> MultiLoraApplier::ApplyShared(
    int64_t layer, const std::vector<Projection>& projections, const torch::Tensor& x,
    const std::vector<torch::Tensor>& ys) const {
  if (AddOnDevice(layer, projections, x, ys)) return ys;
  return LoraApplier::ApplyShared(layer, projections, x, ys);
}

MultiLoraApplier::Gathered MultiLoraApplier::Gather(const LoraStack::Entry& e,
                                                    torch::ScalarType dtype) const {
  const int64_t n = stack_->num_adapters();
  const auto options = torch::TensorOptions().dtype(stack_->dtype()).device(rows_.device());
  torch::Tensor a = torch::zeros({n + 1, e.max_rank, e.in_features}, options);
  torch::Tensor b = torch::zeros({n + 1, e.out_features, e.max_rank}, options);
  for (int64_t s = 0; s < n; ++s) {
    if (!e.a[s].defined()) continue;
    const int64_t r = e.a[s].size(0);
    a[s].narrow(0, 0, r).copy_(e.a[s]);
    b[s].narrow(1, 0, r).copy_(e.b[s]);
  }
  // The kernels' scales, already on the device (a host copy here waited for the stream at every
  // projection), and the none slot's 0.
  const torch::Tensor scale =
      torch::cat({e.scales_f32, torch::zeros({1}, e.scales_f32.options())}).to(rows_.device());
  const int64_t rows = rows_.size(0);
  return {a.index_select(0, rows_).to(dtype), b.index_select(0, rows_).to(dtype),
          scale.index_select(0, rows_).view({rows, 1, 1})};
}

torch::Tensor MultiLoraApplier::Apply(int64_t layer, Projection projection, const torch::Tensor& x,
                                      const torch::Tensor& y) const {
  const LoraStack::Entry& e = stack_->entry(layer, projection);
  if (!e.targeted()) return y;
  if (AddOnDevice(layer, {projection}, x, {y})) return y;
  const int64_t rows = x.size(0);
  const torch::Tensor x3 = x.reshape({rows, -1, x.size(-1)});  // [B, T, in]
  const int32_t uniform = uniform_slot_;
  if (uniform == stack_->none_slot()) return y;           // base-model rows only
  if (uniform >= 0 && !e.a[uniform].defined()) return y;  // its adapter does not target this
  // Each row's A, B and scale: one adapter's tensors broadcast over the rows (no copy), or each
  // row's gathered. Either way a row's sums do not depend on what else is in the batch.
  Gathered g;
  if (uniform >= 0) {
    g.a = e.a[uniform].to(x.scalar_type()).unsqueeze(0).expand({rows, -1, -1});
    g.b = e.b[uniform].to(x.scalar_type()).unsqueeze(0).expand({rows, -1, -1});
    g.scale = torch::full({rows, 1, 1}, e.scale[static_cast<size_t>(uniform)],
                          torch::TensorOptions().dtype(torch::kFloat).device(x.device()));
  } else {
    g = Gather(e, x.scalar_type());
  }
  // Rank first, as PEFT does: the intermediate is [B, T, r].
  const torch::Tensor h = torch::bmm(x3, g.a.transpose(1, 2));
  if (y.is_contiguous() && !y.requires_grad()) {
    // Added into y by one batched GEMM (beta 1) with each row's scale folded into its B: no
    // [B, T, out] temporaries for the product, its scaling and the sum (a prefill of 2,048
    // tokens made three of each projection's output size).
    const torch::Tensor scaled_b = (g.b * g.scale).to(x.scalar_type());  // in fp32, rounded once
    torch::Tensor y3 = y.view({rows, -1, y.size(-1)});
    y3.baddbmm_(h, scaled_b.transpose(1, 2));
    return y;
  }
  // The product in x's dtype times the fp32 scale, rounded once: as PEFT's tensor * float.
  const torch::Tensor delta = (torch::bmm(h, g.b.transpose(1, 2)) * g.scale).to(x.scalar_type());
  return y + delta.view(y.sizes());
}

}  // namespace lorad::engine
