#include "engine/infer/sampler.h"

#include <torch/torch.h>

#include <cmath>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/model/kernel_launch.h"
#include "kernels/sampling.h"

#if defined(LORAD_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace lorad::engine {
namespace {

using kernels::SamplingRow;
using kernels::TokenHistory;

absl::Status OutOfRange(const char* field, const char* range, float got) {
  return absl::InvalidArgumentError(
      absl::StrCat("sampling parameter ", field, " must be ", range, ", got ", got));
}

// Everything Validate checks except max_new_tokens, whose limit the sampler does not know.
absl::Status ValidateDistribution(const SamplingParams& p) {
  if (!std::isfinite(p.temperature) || p.temperature < 0.0f) {
    return OutOfRange("temperature", "finite and >= 0 (0 = greedy)", p.temperature);
  }
  if (p.top_k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling parameter top_k must be >= 0 (0 = off), got ", p.top_k));
  }
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return OutOfRange("top_p", "in (0, 1] (1 = off)", p.top_p);
  }
  if (!(p.min_p >= 0.0f && p.min_p < 1.0f)) {
    return OutOfRange("min_p", "in [0, 1) (0 = off)", p.min_p);
  }
  if (!std::isfinite(p.repetition_penalty) || p.repetition_penalty <= 0.0f) {
    return OutOfRange("repetition_penalty", "finite and > 0 (1 = off)", p.repetition_penalty);
  }
  if (!std::isfinite(p.presence_penalty)) {
    return OutOfRange("presence_penalty", "finite (0 = off)", p.presence_penalty);
  }
  if (!std::isfinite(p.frequency_penalty)) {
    return OutOfRange("frequency_penalty", "finite (0 = off)", p.frequency_penalty);
  }
  if (p.logprobs < 0 || p.logprobs > kMaxLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat("sampling parameter logprobs must be in [0, ",
                                                   kMaxLogprobs, "], got ", p.logprobs));
  }
  return absl::OkStatus();
}

SamplingRow KernelRow(const SampleRow& row) {
  const SamplingParams& p = row.params;
  SamplingRow k;
  k.temperature = p.temperature < kGreedyTemperature ? 0.0f : p.temperature;
  k.top_k = p.top_k;
  k.top_p = p.top_p;
  k.min_p = p.min_p;
  k.repetition_penalty = p.repetition_penalty;
  k.presence_penalty = p.presence_penalty;
  k.frequency_penalty = p.frequency_penalty;
  k.seed = row.seed;
  k.step = row.step;
  return k;
}

bool HasPenalty(const SamplingRow& r) {
  return r.repetition_penalty != 1.0f || r.presence_penalty != 0.0f || r.frequency_penalty != 0.0f;
}

absl::Status CheckTokens(absl::Span<const int32_t> tokens, int64_t vocab, size_t row,
                         const char* which) {
  for (const int32_t t : tokens) {
    if (t < 0 || t >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("sampler row ", row, ": ", which, " token ", t,
                                                     " is outside the vocabulary [0, ", vocab,
                                                     ")"));
    }
  }
  return absl::OkStatus();
}

// The histories of the rows with a penalty, as kernels::TokenHistory's CSR arrays (the other
// rows get none: the kernels skip them).
struct HistoryArrays {
  std::vector<int32_t> tokens;
  std::vector<int64_t> row_begin;
  std::vector<int64_t> generated_begin;
};

HistoryArrays Histories(absl::Span<const SampleRow> rows, const std::vector<SamplingRow>& k) {
  HistoryArrays h;
  h.row_begin.reserve(rows.size() + 1);
  h.generated_begin.reserve(rows.size());
  for (size_t b = 0; b < rows.size(); ++b) {
    h.row_begin.push_back(static_cast<int64_t>(h.tokens.size()));
    if (HasPenalty(k[b]))
      h.tokens.insert(h.tokens.end(), rows[b].prompt.begin(), rows[b].prompt.end());
    h.generated_begin.push_back(static_cast<int64_t>(h.tokens.size()));
    if (HasPenalty(k[b]))
      h.tokens.insert(h.tokens.end(), rows[b].generated.begin(), rows[b].generated.end());
  }
  h.row_begin.push_back(static_cast<int64_t>(h.tokens.size()));
  return h;
}

#if defined(LORAD_WITH_CUDA)
torch::Tensor HostTensor(const void* data, int64_t bytes) {
  return torch::from_blob(const_cast<void*>(data), {bytes}, torch::kUInt8);
}

// Penalties, warp and draw on the logits' GPU; returns the tokens (on the CPU).
torch::Tensor RunCuda(torch::Tensor& work, const std::vector<SamplingRow>& k,
                      const HistoryArrays* history) {
  const torch::Device device = work.device();
  const c10::cuda::CUDAGuard guard(device);
  void* stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int64_t batch = work.size(0), vocab = work.size(1);
  const torch::Tensor rows =
      HostTensor(k.data(), static_cast<int64_t>(k.size() * sizeof(SamplingRow))).to(device);
  const auto* rows_ptr = reinterpret_cast<const SamplingRow*>(rows.data_ptr<uint8_t>());
  if (history != nullptr) {
    const auto i32 = torch::TensorOptions().dtype(torch::kInt32);
    const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
    const torch::Tensor tokens =
        torch::from_blob(const_cast<int32_t*>(history->tokens.data()),
                         {static_cast<int64_t>(history->tokens.size())}, i32)
            .to(device);
    const torch::Tensor row_begin =
        torch::from_blob(const_cast<int64_t*>(history->row_begin.data()), {batch + 1}, i64)
            .to(device);
    const torch::Tensor generated_begin =
        torch::from_blob(const_cast<int64_t*>(history->generated_begin.data()), {batch}, i64)
            .to(device);
    torch::Tensor scratch = torch::zeros({batch, vocab}, i32.device(device));
    TokenHistory h;
    h.tokens = tokens.data_ptr<int32_t>();
    h.row_begin = row_begin.data_ptr<int64_t>();
    h.generated_begin = generated_begin.data_ptr<int64_t>();
    CheckLaunch(kernels::sampling_penalties_cuda(work.data_ptr<float>(), batch, vocab, rows_ptr, h,
                                                 scratch.data_ptr<int32_t>(), stream),
                "sampling_penalties_cuda");
  }
  CheckLaunch(kernels::sampling_warp_cuda(work.data_ptr<float>(), batch, vocab, rows_ptr, stream),
              "sampling_warp_cuda");
  torch::Tensor tokens = torch::empty({batch}, torch::dtype(torch::kInt32).device(device));
  CheckLaunch(kernels::sampling_draw_cuda(work.data_ptr<float>(), batch, vocab, rows_ptr,
                                          tokens.data_ptr<int32_t>(), stream),
              "sampling_draw_cuda");
  return tokens.cpu();
}
#endif

torch::Tensor RunCpu(torch::Tensor& work, const std::vector<SamplingRow>& k,
                     const HistoryArrays* history) {
  const int64_t batch = work.size(0), vocab = work.size(1);
  if (history != nullptr) {
    TokenHistory h;
    h.tokens = history->tokens.data();
    h.row_begin = history->row_begin.data();
    h.generated_begin = history->generated_begin.data();
    kernels::sampling_penalties_cpu(work.data_ptr<float>(), batch, vocab, k.data(), h);
  }
  kernels::sampling_warp_cpu(work.data_ptr<float>(), batch, vocab, k.data());
  torch::Tensor tokens = torch::empty({batch}, torch::kInt32);
  kernels::sampling_draw_cpu(work.data_ptr<float>(), batch, vocab, k.data(),
                             tokens.data_ptr<int32_t>());
  return tokens;
}

// Fills logprob and top_logprobs of the rows that asked for them, from `scores` ([batch, vocab]).
void AddLogprobs(const torch::Tensor& scores, absl::Span<const SampleRow> rows,
                 std::vector<SampledToken>& out) {
  int64_t most = 0;
  for (const SampleRow& r : rows) most = std::max<int64_t>(most, r.params.logprobs);
  if (most == 0) return;
  const torch::Tensor logprobs = torch::log_softmax(scores.to(torch::kFloat), /*dim=*/-1);
  std::vector<int64_t> chosen_ids(out.size());
  for (size_t b = 0; b < out.size(); ++b) chosen_ids[b] = out[b].token;
  const torch::Tensor index =
      torch::tensor(chosen_ids, torch::kInt64).to(logprobs.device()).unsqueeze(1);
  const torch::Tensor chosen = logprobs.gather(1, index).squeeze(1).cpu();
  const auto [top_values, top_ids] = logprobs.topk(std::min(most, logprobs.size(1)), /*dim=*/-1);
  const torch::Tensor values = top_values.cpu(), ids = top_ids.cpu();
  const auto chosen_a = chosen.accessor<float, 1>();
  const auto values_a = values.accessor<float, 2>();
  const auto ids_a = ids.accessor<int64_t, 2>();
  for (size_t b = 0; b < out.size(); ++b) {
    const int64_t n = std::min<int64_t>(rows[b].params.logprobs, values.size(1));
    if (n == 0) continue;
    out[b].logprob = chosen_a[b];
    for (int64_t i = 0; i < n; ++i) {
      out[b].top_logprobs.push_back({static_cast<int32_t>(ids_a[b][i]), values_a[b][i]});
    }
  }
}

}  // namespace

absl::Status SamplingParams::Validate(int32_t max_new_tokens_limit) const {
  if (max_new_tokens < 1 || max_new_tokens > max_new_tokens_limit) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling parameter max_new_tokens must be in [1, ", max_new_tokens_limit,
                     "] (the server's limit), got ", max_new_tokens));
  }
  return ValidateDistribution(*this);
}

uint64_t ResolveSeed(const SamplingParams& params) {
  if (params.seed.has_value()) return *params.seed;
  std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) ^ device();
}

absl::StatusOr<std::vector<SampledToken>> Sampler::Sample(const torch::Tensor& logits,
                                                          absl::Span<const SampleRow> rows) const {
  if (!logits.defined() || logits.dim() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampler logits must be [batch, vocab], got ",
        logits.defined() ? c10::str(logits.sizes()) : std::string("an undefined tensor")));
  }
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  if (batch != static_cast<int64_t>(rows.size())) {
    return absl::InvalidArgumentError(absl::StrCat("sampler logits have ", batch, " rows but ",
                                                   rows.size(), " rows of parameters were given"));
  }
  if (vocab < 1 || vocab > kernels::kSamplingMaxVocab) {
    return absl::InvalidArgumentError(absl::StrCat("sampler vocabulary size must be in [1, ",
                                                   kernels::kSamplingMaxVocab, "], got ", vocab));
  }
  const torch::ScalarType dtype = logits.scalar_type();
  if (dtype != torch::kFloat && dtype != torch::kBFloat16 && dtype != torch::kHalf) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampler logits must be fp32, bf16 or fp16, got ", c10::toString(dtype)));
  }
  if (!logits.device().is_cpu() && !logits.device().is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampler logits must be on the CPU or a CUDA device, got ", logits.device().str()));
  }
#if !defined(LORAD_WITH_CUDA)
  if (logits.device().is_cuda()) {
    return absl::FailedPreconditionError(
        "sampler: logits are on CUDA but lorad was built "
        "without CUDA kernels (LORAD_CUDA=OFF)");
  }
#endif
  std::vector<SamplingRow> k;
  k.reserve(rows.size());
  bool any_penalty = false;
  for (size_t b = 0; b < rows.size(); ++b) {
    if (absl::Status s = ValidateDistribution(rows[b].params); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("sampler row ", b, ": ", s.message()));
    }
    k.push_back(KernelRow(rows[b]));
    if (!HasPenalty(k.back())) continue;
    any_penalty = true;
    if (absl::Status s = CheckTokens(rows[b].prompt, vocab, b, "prompt"); !s.ok()) return s;
    if (absl::Status s = CheckTokens(rows[b].generated, vocab, b, "generated"); !s.ok()) return s;
  }

  try {
    const torch::NoGradGuard no_grad;
    // A private fp32 copy: the kernels work in place and the caller's logits stay as they were.
    torch::Tensor work =
        logits.to(torch::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
    HistoryArrays history;
    if (any_penalty) history = Histories(rows, k);
    const HistoryArrays* h = any_penalty ? &history : nullptr;
    torch::Tensor tokens;
    if (work.is_cuda()) {
#if defined(LORAD_WITH_CUDA)
      tokens = RunCuda(work, k, h);
#endif
    } else {
      tokens = RunCpu(work, k, h);
    }
    std::vector<SampledToken> out(rows.size());
    const auto tokens_a = tokens.accessor<int32_t, 1>();
    for (size_t b = 0; b < out.size(); ++b) out[b].token = tokens_a[b];
    AddLogprobs(mode_ == LogprobsMode::kRaw ? logits : work, rows, out);
    return out;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("sampler: ", e.what_without_backtrace()));
  }
}

}  // namespace lorad::engine
