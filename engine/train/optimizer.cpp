#include "engine/train/optimizer.h"

#include <cmath>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kernels/adamw8bit.h"
#include "kernels/dynamic_quant8.h"

#if defined(LORAD_WITH_CUDA)
#include <c10/cuda/CUDAStream.h>
#endif

namespace lorad::engine {
namespace {

// Values of the "kind" entry of a saved state; 0 is never written, so a zeroed tensor is an error.
constexpr int64_t kKindCodeAdamW = 1;
constexpr int64_t kKindCodeAdamW8bit = 2;

int64_t KindCode(OptimizerKind kind) {
  return kind == OptimizerKind::kAdamW ? kKindCodeAdamW : kKindCodeAdamW8bit;
}

absl::Status CheckGrad(size_t index, const torch::Tensor& param, const torch::Tensor& grad) {
  if (param.is_meta()) {
    return absl::FailedPreconditionError(
        absl::StrCat("optimizer: parameter ", index, " is a meta tensor (accounting only)"));
  }
  if (grad.layout() != torch::kStrided) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer: parameter ", index, " has a sparse gradient; only dense ones"));
  }
  if (grad.sizes() != param.sizes() || grad.scalar_type() != torch::kFloat ||
      grad.device() != param.device()) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer: parameter ", index, " (", c10::str(param.sizes()), " fp32 on ",
                     param.device().str(), ") has a gradient of ", c10::str(grad.sizes()), " ",
                     c10::toString(grad.scalar_type()), " on ", grad.device().str()));
  }
  return absl::OkStatus();
}

torch::Tensor Int64Scalar(int64_t value) { return torch::tensor({value}, torch::kInt64); }

// A copy of `t` on the CPU that shares nothing with the optimizer.
// One copy (to(kCPU) of a device tensor, then clone(), copied it twice: 40-80 ms more of a
// checkpoint's snapshot on the GPU loop for an 8B-shaped job's optimizer state).
torch::Tensor CpuCopy(const torch::Tensor& t) {
  return t.detach().to(torch::kCPU, /*non_blocking=*/false, /*copy=*/true);
}

std::string ParamKey(size_t index, const char* name) {
  return absl::StrCat("params.", index, ".", name);
}

// The state saved for one parameter, split out of an OptimizerState by index.
struct SavedParam {
  std::map<std::string, torch::Tensor> tensors;  // name ("step", "exp_avg", ...) -> tensor
};

// Checks "kind" and "num_params" and groups the "params.<i>.<name>" entries by i. Any other key is
// an error: a checkpoint from another layout must not load half-way.
absl::StatusOr<std::vector<SavedParam>> SplitState(const OptimizerState& state, OptimizerKind kind,
                                                   size_t num_params) {
  auto scalar = [&](const std::string& key) -> absl::StatusOr<int64_t> {
    auto it = state.find(key);
    if (it == state.end()) {
      return absl::InvalidArgumentError(absl::StrCat("optimizer state: missing \"", key, "\""));
    }
    const torch::Tensor& t = it->second;
    if (!t.defined() || t.scalar_type() != torch::kInt64 || t.numel() != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("optimizer state: \"", key, "\" must be an int64 tensor of one element"));
    }
    return t.item<int64_t>();
  };
  absl::StatusOr<int64_t> saved_kind = scalar("kind");
  if (!saved_kind.ok()) return saved_kind.status();
  if (*saved_kind != KindCode(kind)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "optimizer state: saved by another optimizer (kind code ", *saved_kind, "), loading into ",
        OptimizerKindName(kind), " (kind code ", KindCode(kind), ")"));
  }
  absl::StatusOr<int64_t> saved_params = scalar("num_params");
  if (!saved_params.ok()) return saved_params.status();
  if (*saved_params != static_cast<int64_t>(num_params)) {
    return absl::InvalidArgumentError(absl::StrCat("optimizer state: saved for ", *saved_params,
                                                   " parameters, this optimizer has ", num_params));
  }
  std::vector<SavedParam> out(num_params);
  for (const auto& [key, tensor] : state) {
    if (key == "kind" || key == "num_params") continue;
    std::vector<std::string> parts = absl::StrSplit(key, absl::MaxSplits('.', 2));
    size_t index = 0;
    if (parts.size() != 3 || parts[0] != "params" || !absl::SimpleAtoi(parts[1], &index) ||
        index >= num_params) {
      return absl::InvalidArgumentError(
          absl::StrCat("optimizer state: unexpected key \"", key, "\" (", num_params,
                       " parameters; keys are params.<index>.<name>)"));
    }
    if (!tensor.defined()) {
      return absl::InvalidArgumentError(absl::StrCat("optimizer state: \"", key, "\" is empty"));
    }
    out[index].tensors[parts[2]] = tensor;
  }
  return out;
}

// Takes saved tensor `name` of parameter `index`: dtype and shape checked, copied to `device`.
absl::StatusOr<torch::Tensor> TakeTensor(SavedParam& saved, size_t index, const char* name,
                                         torch::ScalarType dtype, torch::IntArrayRef shape,
                                         const torch::Device& device) {
  auto it = saved.tensors.find(name);
  if (it == saved.tensors.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer state: missing \"", ParamKey(index, name), "\""));
  }
  const torch::Tensor t = it->second;
  saved.tensors.erase(it);
  if (t.scalar_type() != dtype || t.sizes() != shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "optimizer state: \"", ParamKey(index, name), "\" is ", c10::toString(t.scalar_type()), " ",
        c10::str(t.sizes()), ", expected ", c10::toString(dtype), " ", c10::str(shape)));
  }
  return t.to(device, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

// The saved step of a parameter, or 0 when the checkpoint has none (it had not stepped yet).
absl::StatusOr<int64_t> TakeStep(SavedParam& saved, size_t index) {
  auto it = saved.tensors.find("step");
  if (it == saved.tensors.end()) {
    if (!saved.tensors.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("optimizer state: \"", ParamKey(index, saved.tensors.begin()->first.c_str()),
                       "\" without \"", ParamKey(index, "step"), "\""));
    }
    return 0;
  }
  const torch::Tensor t = it->second;
  saved.tensors.erase(it);
  if (t.scalar_type() != torch::kInt64 || t.numel() != 1 || t.item<int64_t>() < 1) {
    return absl::InvalidArgumentError(absl::StrCat("optimizer state: \"", ParamKey(index, "step"),
                                                   "\" must be an int64 [1] >= 1"));
  }
  return t.item<int64_t>();
}

absl::Status NoLeftovers(const SavedParam& saved, size_t index) {
  if (saved.tensors.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("optimizer state: unexpected key \"",
                   ParamKey(index, saved.tensors.begin()->first.c_str()), "\""));
}

// The two fields every saved optimizer state starts with.
OptimizerState StateHeader(OptimizerKind kind, size_t num_params) {
  return {{"kind", Int64Scalar(KindCode(kind))},
          {"num_params", Int64Scalar(static_cast<int64_t>(num_params))}};
}

// What both optimizers' LoadState share: split the saved state per parameter, read each one's
// step, let `read(saved, index, state)` take its tensors when it has stepped, and refuse any key
// left over. Nothing is replaced unless every parameter loads.
template <typename ParamState, typename Read>
absl::StatusOr<std::vector<ParamState>> LoadParamStates(const OptimizerState& state,
                                                        OptimizerKind kind, size_t num_params,
                                                        Read read) {
  absl::StatusOr<std::vector<SavedParam>> saved = SplitState(state, kind, num_params);
  if (!saved.ok()) return saved.status();
  std::vector<ParamState> loaded(num_params);
  for (size_t i = 0; i < num_params; ++i) {
    SavedParam& sp = (*saved)[i];
    absl::StatusOr<int64_t> step = TakeStep(sp, i);
    if (!step.ok()) return step.status();
    loaded[i].step = *step;
    if (*step > 0) {
      if (absl::Status s = read(sp, i, loaded[i]); !s.ok()) return s;
    }
    if (absl::Status s = NoLeftovers(sp, i); !s.ok()) return s;
  }
  return loaded;
}

absl::Status TorchError(const char* what, const c10::Error& e) {
  return absl::InternalError(absl::StrCat(what, ": ", e.what_without_backtrace()));
}

// ---------------------------------------------------------------------------------------------
// AdamW: torch.optim.AdamW (single-tensor implementation, the CPU default), same ops in the same
// order so the results are bit-identical to torch on the same machine.
class AdamW final : public Optimizer {
 public:
  AdamW(std::vector<torch::Tensor> params, const OptimizerOptions& options)
      : Optimizer(std::move(params), options), state_(params_.size()) {}

  OptimizerKind kind() const override { return OptimizerKind::kAdamW; }

  absl::Status Step(double lr) override {
    try {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < params_.size(); ++i) {
        torch::Tensor& p = params_[i];
        const torch::Tensor& g = p.grad();
        if (!g.defined()) continue;
        if (absl::Status s = CheckGrad(i, p, g); !s.ok()) return s;
        ParamState& st = state_[i];
        if (st.step == 0) {
          st.exp_avg = torch::zeros_like(p, torch::MemoryFormat::Preserve);
          st.exp_avg_sq = torch::zeros_like(p, torch::MemoryFormat::Preserve);
        }
        st.step += 1;
        if (options_.weight_decay != 0.0) p.mul_(1.0 - lr * options_.weight_decay);
        st.exp_avg.lerp_(g, 1.0 - options_.beta1);
        st.exp_avg_sq.mul_(options_.beta2).addcmul_(g, g, 1.0 - options_.beta2);
        const double t = static_cast<double>(st.step);
        const double bias_correction1 = 1.0 - std::pow(options_.beta1, t);
        const double bias_correction2 = 1.0 - std::pow(options_.beta2, t);
        const double step_size = lr / bias_correction1;
        const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);  // torch: ** 0.5
        torch::Tensor denom = (st.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(options_.eps);
        p.addcdiv_(st.exp_avg, denom, -step_size);
      }
    } catch (const c10::Error& e) {
      return TorchError("AdamW step", e);
    }
    return absl::OkStatus();
  }

  int64_t StateBytes() const override {
    int64_t bytes = 0;
    for (const torch::Tensor& p : params_) bytes += 2 * p.numel() * 4;
    return bytes;
  }

  OptimizerState SaveState() const override {
    OptimizerState out = StateHeader(kind(), params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      const ParamState& st = state_[i];
      if (st.step == 0) continue;
      out[ParamKey(i, "step")] = Int64Scalar(st.step);
      out[ParamKey(i, "exp_avg")] = CpuCopy(st.exp_avg);
      out[ParamKey(i, "exp_avg_sq")] = CpuCopy(st.exp_avg_sq);
    }
    return out;
  }

  absl::Status LoadState(const OptimizerState& state) override {
    try {
      auto loaded = LoadParamStates<ParamState>(
          state, kind(), params_.size(),
          [&](SavedParam& sp, size_t i, ParamState& st) -> absl::Status {
            const torch::Tensor& p = params_[i];
            auto m = TakeTensor(sp, i, "exp_avg", torch::kFloat, p.sizes(), p.device());
            if (!m.ok()) return m.status();
            auto v = TakeTensor(sp, i, "exp_avg_sq", torch::kFloat, p.sizes(), p.device());
            if (!v.ok()) return v.status();
            st.exp_avg = *std::move(m);
            st.exp_avg_sq = *std::move(v);
            return absl::OkStatus();
          });
      if (!loaded.ok()) return loaded.status();
      state_ = *std::move(loaded);
    } catch (const c10::Error& e) {
      return TorchError("AdamW load state", e);
    }
    return absl::OkStatus();
  }

 private:
  struct ParamState {
    int64_t step = 0;
    torch::Tensor exp_avg;     // m, fp32, the parameter's shape
    torch::Tensor exp_avg_sq;  // v, fp32, the parameter's shape
  };
  std::vector<ParamState> state_;
};

// ---------------------------------------------------------------------------------------------
// AdamW8bit: bitsandbytes' Optimizer2State("adam", optim_bits=8) step by step.
class AdamW8bit final : public Optimizer {
 public:
  AdamW8bit(std::vector<torch::Tensor> params, const OptimizerOptions& options)
      : Optimizer(std::move(params), options), state_(params_.size()) {}

  OptimizerKind kind() const override { return OptimizerKind::kAdamW8bit; }

  absl::Status Step(double lr) override {
    try {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < params_.size(); ++i) {
        torch::Tensor& p = params_[i];
        if (!p.grad().defined()) continue;
        if (absl::Status s = CheckGrad(i, p, p.grad()); !s.ok()) return s;
        ParamState& st = state_[i];
        if (st.step == 0) Allocate(p, st);
        if (!Uses8bit(p)) {
          Step32bit(i, lr, st);
        } else if (absl::Status s = Step8bit(i, lr, st); !s.ok()) {
          return s;
        }
      }
    } catch (const c10::Error& e) {
      return TorchError("AdamW8bit step", e);
    }
    return absl::OkStatus();
  }

  int64_t StateBytes() const override {
    int64_t bytes = 0;
    bool any_8bit = false;
    for (const torch::Tensor& p : params_) {
      if (Uses8bit(p)) {
        any_8bit = true;
        bytes += 2 * p.numel() + 2 * Blocks(p) * 4;  // two uint8 codes + two fp32 scales per block
      } else {
        bytes += 2 * p.numel() * 4;
      }
    }
    // The two code books (256 fp32 each), shared by every 8-bit parameter on a device.
    if (any_8bit) bytes += 2 * 256 * 4;
    return bytes;
  }

  OptimizerState SaveState() const override {
    OptimizerState out = StateHeader(kind(), params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      const ParamState& st = state_[i];
      if (st.step == 0) continue;
      out[ParamKey(i, "step")] = Int64Scalar(st.step);
      out[ParamKey(i, "state1")] = CpuCopy(st.state1);
      out[ParamKey(i, "state2")] = CpuCopy(st.state2);
      if (st.absmax1.defined()) {
        out[ParamKey(i, "absmax1")] = CpuCopy(st.absmax1);
        out[ParamKey(i, "absmax2")] = CpuCopy(st.absmax2);
      }
    }
    return out;
  }

  absl::Status LoadState(const OptimizerState& state) override {
    try {
      auto loaded = LoadParamStates<ParamState>(
          state, kind(), params_.size(),
          [&](SavedParam& sp, size_t i, ParamState& st) -> absl::Status {
            const torch::Tensor& p = params_[i];
            // The layout follows min_8bit_size: a checkpoint written with another threshold
            // fails here on the dtype of state1 instead of being misread.
            const torch::ScalarType dtype = Uses8bit(p) ? torch::kUInt8 : torch::kFloat;
            auto s1 = TakeTensor(sp, i, "state1", dtype, p.sizes(), p.device());
            if (!s1.ok()) return s1.status();
            auto s2 = TakeTensor(sp, i, "state2", dtype, p.sizes(), p.device());
            if (!s2.ok()) return s2.status();
            st.state1 = *std::move(s1);
            st.state2 = *std::move(s2);
            if (!Uses8bit(p)) return absl::OkStatus();
            const std::vector<int64_t> blocks{Blocks(p)};
            auto a1 = TakeTensor(sp, i, "absmax1", torch::kFloat, blocks, p.device());
            if (!a1.ok()) return a1.status();
            auto a2 = TakeTensor(sp, i, "absmax2", torch::kFloat, blocks, p.device());
            if (!a2.ok()) return a2.status();
            st.absmax1 = *std::move(a1);
            st.absmax2 = *std::move(a2);
            return absl::OkStatus();
          });
      if (!loaded.ok()) return loaded.status();
      state_ = *std::move(loaded);
    } catch (const c10::Error& e) {
      return TorchError("AdamW8bit load state", e);
    }
    return absl::OkStatus();
  }

 private:
  struct ParamState {
    int64_t step = 0;
    torch::Tensor state1;   // m: uint8 codes (8-bit) or fp32, the parameter's shape
    torch::Tensor state2;   // v: uint8 codes (8-bit) or fp32, the parameter's shape
    torch::Tensor absmax1;  // [blocks] fp32, 8-bit only
    torch::Tensor absmax2;  // [blocks] fp32, 8-bit only
  };

  bool Uses8bit(const torch::Tensor& p) const { return p.numel() >= options_.min_8bit_size; }
  static int64_t Blocks(const torch::Tensor& p) {
    return (p.numel() + kernels::kAdamW8bitBlockSize - 1) / kernels::kAdamW8bitBlockSize;
  }

  // bitsandbytes' init_state: zeros, which dequantize to m = v = 0 whatever the code book.
  void Allocate(const torch::Tensor& p, ParamState& st) const {
    const auto dtype = Uses8bit(p) ? torch::kUInt8 : torch::kFloat;
    st.state1 = torch::zeros(p.sizes(), p.options().dtype(dtype));
    st.state2 = torch::zeros(p.sizes(), p.options().dtype(dtype));
    if (Uses8bit(p)) {
      st.absmax1 = torch::zeros({Blocks(p)}, p.options().dtype(torch::kFloat));
      st.absmax2 = torch::zeros({Blocks(p)}, p.options().dtype(torch::kFloat));
    }
  }

  // bitsandbytes' optimizer_update_32bit for "adam" on CPU, op for op.
  void Step32bit(size_t index, double lr, ParamState& st) {
    torch::Tensor& p = params_[index];
    const torch::Tensor& g = p.grad();
    st.step += 1;
    st.state1.mul_(options_.beta1).add_(g, 1.0 - options_.beta1);
    st.state2.mul_(options_.beta2).addcmul_(g, g, 1.0 - options_.beta2);
    const double t = static_cast<double>(st.step);
    const double correction1 = 1.0 - std::pow(options_.beta1, t);
    const double correction2 = std::sqrt(1.0 - std::pow(options_.beta2, t));
    const double step_size = -lr * correction2 / correction1;
    if (options_.weight_decay > 0.0) p.mul_(1.0 - lr * options_.weight_decay);
    torch::Tensor update = st.state1 / (st.state2.sqrt() + options_.eps * correction2);
    p.add_(update, step_size);
  }

  absl::Status Step8bit(size_t index, double lr, ParamState& st) {
    torch::Tensor& p = params_[index];
    const torch::Tensor g = p.grad().contiguous();
    st.step += 1;
    const kernels::AdamW8bitScalars s = kernels::adamw8bit_scalars(
        lr, options_.beta1, options_.beta2, options_.eps, options_.weight_decay, st.step);
    float* param = p.data_ptr<float>();
    const float* grad = g.data_ptr<float>();
    uint8_t* q1 = st.state1.data_ptr<uint8_t>();
    uint8_t* q2 = st.state2.data_ptr<uint8_t>();
    float* absmax1 = st.absmax1.data_ptr<float>();
    float* absmax2 = st.absmax2.data_ptr<float>();
    if (p.is_cpu()) {
      kernels::adamw8bit_step_cpu(param, grad, q1, q2, absmax1, absmax2, kernels::kDynamicMapSigned,
                                  kernels::kDynamicMapUnsigned, p.numel(), s);
      return absl::OkStatus();
    }
#if defined(LORAD_WITH_CUDA)
    if (p.is_cuda()) {
      const CodeBooks& books = CodeBooksOn(p.device());
      const char* err = kernels::adamw8bit_step_cuda(
          param, grad, q1, q2, absmax1, absmax2, books.code1.data_ptr<float>(),
          books.code2.data_ptr<float>(), p.numel(), s,
          c10::cuda::getCurrentCUDAStream(p.device().index()).stream());
      if (err != nullptr) {
        st.step -= 1;
        return absl::InternalError(
            absl::StrCat("AdamW8bit step: parameter ", index, ": CUDA launch failed: ", err));
      }
      return absl::OkStatus();
    }
#endif
    st.step -= 1;
    return absl::FailedPreconditionError(absl::StrCat("AdamW8bit: parameter ", index, " is on ",
                                                      p.device().str(),
                                                      ", which has no 8-bit optimizer kernel"));
  }

  struct CodeBooks {
    torch::Tensor code1;  // [256] fp32, kDynamicMapSigned
    torch::Tensor code2;  // [256] fp32, kDynamicMapUnsigned
  };
  // The code books on `device`, uploaded at the first 8-bit step there.
  const CodeBooks& CodeBooksOn(const torch::Device& device) {
    const std::string key = device.str();
    auto it = code_books_.find(key);
    if (it == code_books_.end()) {
      auto from = [&](const float* values) {
        return torch::from_blob(const_cast<float*>(values), {256}, torch::kFloat).to(device);
      };
      it = code_books_
               .emplace(key, CodeBooks{from(kernels::kDynamicMapSigned),
                                       from(kernels::kDynamicMapUnsigned)})
               .first;
    }
    return it->second;
  }

  std::vector<ParamState> state_;
  std::map<std::string, CodeBooks> code_books_;
};

}  // namespace

absl::StatusOr<OptimizerKind> OptimizerKindFromName(const std::string& name) {
  if (name == "adamw") return OptimizerKind::kAdamW;
  if (name == "adamw_8bit") return OptimizerKind::kAdamW8bit;
  return absl::InvalidArgumentError(
      absl::StrCat("optimizer: unknown \"", name, "\" (expected \"adamw\" or \"adamw_8bit\")"));
}

const char* OptimizerKindName(OptimizerKind kind) {
  return kind == OptimizerKind::kAdamW ? "adamw" : "adamw_8bit";
}

absl::Status ValidateOptimizerOptions(const OptimizerOptions& o) {
  // Negated comparisons so NaN fails too.
  if (!(o.beta1 >= 0.0 && o.beta1 < 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("optimizer: beta1 ", o.beta1, " not in [0, 1)"));
  }
  if (!(o.beta2 >= 0.0 && o.beta2 < 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("optimizer: beta2 ", o.beta2, " not in [0, 1)"));
  }
  if (!(o.eps >= 0.0) || std::isinf(o.eps)) {
    return absl::InvalidArgumentError(absl::StrCat("optimizer: eps ", o.eps, " must be >= 0"));
  }
  if (!(o.weight_decay >= 0.0) || std::isinf(o.weight_decay)) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer: weight_decay ", o.weight_decay, " must be >= 0"));
  }
  if (o.min_8bit_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer: min_8bit_size ", o.min_8bit_size, " must be >= 1"));
  }
  return absl::OkStatus();
}

void Optimizer::ZeroGrad() {
  for (torch::Tensor& p : params_) p.mutable_grad().reset();
}

absl::StatusOr<std::unique_ptr<Optimizer>> MakeOptimizer(OptimizerKind kind,
                                                         std::vector<torch::Tensor> params,
                                                         const OptimizerOptions& options) {
  if (absl::Status s = ValidateOptimizerOptions(options); !s.ok()) return s;
  std::set<const void*> seen;
  for (size_t i = 0; i < params.size(); ++i) {
    const torch::Tensor& p = params[i];
    if (!p.defined()) {
      return absl::InvalidArgumentError(absl::StrCat("optimizer: parameter ", i, " is undefined"));
    }
    if (p.scalar_type() != torch::kFloat || !p.is_contiguous() || p.layout() != torch::kStrided) {
      return absl::InvalidArgumentError(
          absl::StrCat("optimizer: parameter ", i, " is ", c10::toString(p.scalar_type()),
                       p.is_contiguous() ? "" : " non-contiguous",
                       "; the optimizer updates contiguous fp32 master weights"));
    }
    if (!p.is_cpu() && !p.is_cuda() && !p.is_meta()) {
      return absl::InvalidArgumentError(absl::StrCat("optimizer: parameter ", i, " is on ",
                                                     p.device().str(), " (CPU or CUDA only)"));
    }
    if (!seen.insert(p.unsafeGetTensorImpl()).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "optimizer: parameter ", i, " is listed twice; it would be updated twice per step"));
    }
  }
  if (kind == OptimizerKind::kAdamW) return std::make_unique<AdamW>(std::move(params), options);
  return std::make_unique<AdamW8bit>(std::move(params), options);
}

}  // namespace lorad::engine
