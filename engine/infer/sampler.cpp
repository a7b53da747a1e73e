#include "engine/infer/sampler.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/model/kernel_launch.h"
#include "kernels/sampling.h"

#if defined(LORAD_WITH_CUDA)
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace lorad::engine {

// Where the CUDA path's per-step inputs (the rows' kernel parameters and penalty histories) go:
// one pinned host buffer and one device buffer, kept between steps and grown when too small, and
// one asynchronous copy a step. Copies from pageable memory each waited for the stream, that is
// for the forward still running on it; now the host enqueues the sampler's kernels behind the
// forward and waits once, for the tokens.
struct Sampler::Upload {
#if defined(LORAD_WITH_CUDA)
  torch::Tensor host;    // pinned bytes
  torch::Tensor device;  // bytes on the logits' device
  // The last copy out of `host`, then (RunCuda) the last kernel reading `device`.
  std::optional<at::cuda::CUDAEvent> done;
  // The penalty kernels' counting scratch: all zero between steps (they leave it so), so it is
  // zeroed once, not every step. Dropped if a launch fails half-way.
  torch::Tensor penalty_scratch;

  // The device addresses of `pieces` (each 16-byte aligned), after one copy on `stream`.
  std::vector<void*> Send(const std::vector<std::pair<const void*, size_t>>& pieces,
                          const torch::Device& on, const c10::cuda::CUDAStream& stream) {
    std::vector<size_t> offsets;
    size_t total = 0;
    for (const auto& piece : pieces) {
      offsets.push_back(total);
      total += (piece.second + 15) / 16 * 16;
    }
    total = std::max<size_t>(total, 16);
    if (done.has_value()) {
      done->synchronize();  // both buffers free (long since, in a loop)
      // An event records on its own device only: logits on another GPU start a new one.
      if (done->device_index() != on.index()) done.reset();
    }
    const auto capacity = static_cast<int64_t>(std::max<size_t>(
        total, host.defined() ? 2 * static_cast<size_t>(host.numel()) : size_t{4096}));
    if (!host.defined() || static_cast<size_t>(host.numel()) < total) {
      host =
          torch::empty({capacity}, torch::TensorOptions().dtype(torch::kUInt8).pinned_memory(true));
    }
    if (!device.defined() || device.numel() < host.numel() || device.device() != on) {
      device = torch::empty({host.numel()}, torch::TensorOptions().dtype(torch::kUInt8).device(on));
    }
    uint8_t* staged = host.data_ptr<uint8_t>();
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (pieces[i].second > 0) std::memcpy(staged + offsets[i], pieces[i].first, pieces[i].second);
    }
    const auto n = static_cast<int64_t>(total);
    device.narrow(0, 0, n).copy_(host.narrow(0, 0, n), /*non_blocking=*/true);
    if (!done.has_value()) done.emplace();
    done->record(stream);
    std::vector<void*> out;
    for (const size_t offset : offsets) out.push_back(device.data_ptr<uint8_t>() + offset);
    return out;
  }
#endif
};

namespace {

using kernels::SamplingRow;
using kernels::TokenHistory;

absl::Status OutOfRange(const char* field, const char* range, float got) {
  return absl::InvalidArgumentError(
      absl::StrCat("sampling.", field, ": must be ", range, ", got ", got));
}

// Everything Validate checks except max_new_tokens, whose limit the sampler does not know.
absl::Status ValidateDistribution(const SamplingParams& p) {
  if (!std::isfinite(p.temperature) || p.temperature < 0.0f) {
    return OutOfRange("temperature", "finite and >= 0 (0 = greedy)", p.temperature);
  }
  if (p.top_k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.top_k: must be >= 0 (0 = off), got ", p.top_k));
  }
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return OutOfRange("top_p", "in (0, 1] (1 = off)", p.top_p);
  }
  if (!(p.min_p >= 0.0f && p.min_p < 1.0f)) {
    return OutOfRange("min_p", "in [0, 1) (0 = off)", p.min_p);
  }
  // Hugging Face takes any value > 0; past these bounds a logit divided or multiplied by it
  // overflows float (the distribution turns NaN) while no smaller step changes what is sampled.
  if (!(p.repetition_penalty >= 1e-6f && p.repetition_penalty <= 1e6f)) {
    return OutOfRange("repetition_penalty", "in [1e-6, 1e6] (1 = off)", p.repetition_penalty);
  }
  // OpenAI's range (vLLM's too): beyond it a penalty only ever bans or forces tokens.
  if (!(p.presence_penalty >= -2.0f && p.presence_penalty <= 2.0f)) {
    return OutOfRange("presence_penalty", "in [-2, 2] (0 = off)", p.presence_penalty);
  }
  if (!(p.frequency_penalty >= -2.0f && p.frequency_penalty <= 2.0f)) {
    return OutOfRange("frequency_penalty", "in [-2, 2] (0 = off)", p.frequency_penalty);
  }
  if (p.logprobs < 0 || p.logprobs > kMaxLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.logprobs: must be in [0, ", kMaxLogprobs, "], got ", p.logprobs));
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
// Penalties, warp and draw on the logits' GPU; returns the tokens (on the CPU). Nothing here
// waits for the device but the tokens' copy back.
torch::Tensor RunCuda(torch::Tensor& work, const torch::Tensor& nan_rows,
                      const std::vector<SamplingRow>& k, const HistoryArrays* history,
                      Sampler::Upload& upload) {
  const torch::Device device = work.device();
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream cuda_stream = c10::cuda::getCurrentCUDAStream(device.index());
  void* stream = cuda_stream.stream();
  const int64_t batch = work.size(0), vocab = work.size(1);
  std::vector<std::pair<const void*, size_t>> pieces = {{k.data(), k.size() * sizeof(SamplingRow)}};
  if (history != nullptr) {
    pieces.push_back({history->tokens.data(), history->tokens.size() * sizeof(int32_t)});
    pieces.push_back({history->row_begin.data(), history->row_begin.size() * sizeof(int64_t)});
    pieces.push_back(
        {history->generated_begin.data(), history->generated_begin.size() * sizeof(int64_t)});
  }
  const std::vector<void*> on_device = upload.Send(pieces, device, cuda_stream);
  const auto* rows_ptr = static_cast<const SamplingRow*>(on_device[0]);
  if (history != nullptr) {
    torch::Tensor scratch = std::move(upload.penalty_scratch);  // back after a clean launch
    if (!scratch.defined() || scratch.numel() < batch * vocab || scratch.device() != device) {
      scratch = torch::zeros({batch * vocab}, torch::dtype(torch::kInt32).device(device));
    }
    TokenHistory h;
    h.tokens = static_cast<const int32_t*>(on_device[1]);
    h.row_begin = static_cast<const int64_t*>(on_device[2]);
    h.generated_begin = static_cast<const int64_t*>(on_device[3]);
    CheckLaunch(kernels::sampling_penalties_cuda(work.data_ptr<float>(), batch, vocab, rows_ptr, h,
                                                 scratch.data_ptr<int32_t>(), stream),
                "sampling_penalties_cuda");
    upload.penalty_scratch = std::move(scratch);
  }
  // The warpers leave greedy rows alone: no launch when every row is greedy.
  if (std::any_of(k.begin(), k.end(), [](const SamplingRow& r) { return r.temperature > 0.0f; })) {
    CheckLaunch(kernels::sampling_warp_cuda(work.data_ptr<float>(), batch, vocab, rows_ptr, stream),
                "sampling_warp_cuda");
  }
  torch::Tensor tokens = torch::empty({batch}, torch::dtype(torch::kInt32).device(device));
  CheckLaunch(kernels::sampling_draw_cuda(work.data_ptr<float>(), batch, vocab, rows_ptr,
                                          tokens.data_ptr<int32_t>(), stream),
              "sampling_draw_cuda");
  // The kernels are the last readers of the device buffer: the next upload waits for them too.
  upload.done->record(cuda_stream);
  tokens.masked_fill_(nan_rows, kNanLogitsToken);  // on the device: still one copy back
  return tokens.cpu();
}
#endif

torch::Tensor RunCpu(torch::Tensor& work, const torch::Tensor& nan_rows,
                     const std::vector<SamplingRow>& k, const HistoryArrays* history) {
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
  tokens.masked_fill_(nan_rows, kNanLogitsToken);
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
  // A row of NaN logits (kNanLogitsToken) gathers at 0 and gets none: an index of -1 threw on
  // the CPU and was a device-side assert on CUDA (every later CUDA call failed).
  for (size_t b = 0; b < out.size(); ++b) chosen_ids[b] = std::max<int32_t>(out[b].token, 0);
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
    if (n == 0 || out[b].token == kNanLogitsToken) continue;
    out[b].logprob = chosen_a[b];
    for (int64_t i = 0; i < n; ++i) {
      // A token the filters removed (-inf: top-k, top-p, min-p) is not a candidate: not listed.
      if (std::isinf(values_a[b][i]) && values_a[b][i] < 0) break;  // sorted: the rest are too
      out[b].top_logprobs.push_back({static_cast<int32_t>(ids_a[b][i]), values_a[b][i], {}, {}});
    }
  }
}

}  // namespace

Sampler::Sampler(LogprobsMode mode) : mode_(mode), upload_(std::make_unique<Upload>()) {}
Sampler::~Sampler() = default;

absl::Status SamplingParams::Validate(int32_t max_new_tokens_limit) const {
  if (max_new_tokens < 1 || max_new_tokens > max_new_tokens_limit) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.max_new_tokens: must be in [1, ",
                                                   max_new_tokens_limit,
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
    // A row holding NaN has no distribution: the kernels assume none (the CPU top-p loop never
    // ended on one; the GPU drew the NaN's index, or token 0 from a row of NaN, as if it were
    // text). Such a row is reported as kNanLogitsToken. Found by its sum (NaN also for a row
    // holding both infinities, which has no distribution either): two small ops a step on the
    // GPU, where the row's token is replaced; the CPU kernels get zeros in its place.
    const torch::Tensor nan_rows = work.sum(/*dim=*/1).isnan();
    if (!work.is_cuda()) work.masked_fill_(nan_rows.unsqueeze(1), 0.0f);
    HistoryArrays history;
    if (any_penalty) history = Histories(rows, k);
    const HistoryArrays* h = any_penalty ? &history : nullptr;
    torch::Tensor tokens;
    if (work.is_cuda()) {
#if defined(LORAD_WITH_CUDA)
      tokens = RunCuda(work, nan_rows, k, h, *upload_);
#endif
    } else {
      tokens = RunCpu(work, nan_rows, k, h);
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
