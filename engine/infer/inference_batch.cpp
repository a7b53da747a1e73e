// InferenceEngine::Impl's batch: the adapter stack a step's rows need, their logits (the decode
// runner, or a padded forward), sampling, and each sequence's accepted token (stops, finish).
#include <algorithm>
#include <set>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "engine/infer/inference_engine_impl.h"
#include "engine/infer/stop_matcher.h"
#include "engine/model/incremental_detokenizer.h"
#include "engine/model/utf8.h"

namespace lorad::engine {

using inference::AdapterKey;
using inference::Clock;
using inference::Row;
using inference::Sequence;

absl::StatusOr<std::shared_ptr<const LoraStack>> InferenceEngine::Impl::StackFor(
    const std::vector<Row>& rows, std::vector<int32_t>* slots) {
  std::vector<std::string> keys;
  std::vector<const LoraAdapter*> adapters;
  for (const Row& r : rows) {
    if (r.seq->device == nullptr) {
      slots->push_back(-1);
      continue;
    }
    const std::string key = r.seq->adapter_key();
    auto it = std::find(keys.begin(), keys.end(), key);
    if (it == keys.end()) {
      keys.push_back(key);
      adapters.push_back(r.seq->device);
      it = keys.end() - 1;
    }
    slots->push_back(static_cast<int32_t>(it - keys.begin()));
  }
  // No adapter in this step: the stack stays for the next step that has them (a base-model
  // request between two on an adapter costs no rebuild).
  if (keys.empty()) return std::shared_ptr<const LoraStack>();
  // Slots follow first appearance, so the same set in another order is a new stack; rebuilding
  // costs one copy of the adapters, and stable batches (the common case) reuse it.
  if (stack != nullptr && keys == stack_key) return stack;
  auto built = LoraStack::Build(adapters, model->config().num_hidden_layers,
                                model->options().device, model->options().dtype);
  if (!built.ok()) return built.status();
  ++lora_stacks_built;
  stack = *built;
  stack_key = keys;
  lora_stack_adapters = static_cast<int32_t>(keys.size());
  lora_stack_bytes = stack->bytes();
  return stack;
}

absl::StatusOr<torch::Tensor> InferenceEngine::Impl::Logits(const std::vector<Row>& rows) {
  std::vector<int32_t> slots;
  auto stack_or = StackFor(rows, &slots);
  if (!stack_or.ok()) return stack_or.status();
  // The step's rows in parts, each one pass over the base weights: the decode rows through the
  // decode runner, the rest (prefill pieces) through the padded forward, where every row is as
  // wide as the widest of its part. Widest first, a piece joins the current part while the
  // part's padding stays within kMaxPaddingTokens, else it starts the next: a padded token costs
  // about what it costs to compute it, an extra part one more pass over the weights (for an 8B
  // NF4 base about as long as 270 tokens of compute). So 31 decoding sequences beside a new
  // 2,048-token prompt cost 31 + 2,048 tokens, not 32 x 2,048, and a 10-token prompt beside it
  // is not padded to 2,048.
  constexpr int64_t kMaxPaddingTokens = 256;
  const auto decodes = [this](const Row& r) {
    return decoder != nullptr && r.tokens == 1 && r.samples;
  };
  std::vector<int> part_of(rows.size(), -1);
  int parts = 0;
  if (std::any_of(rows.begin(), rows.end(), decodes)) {
    for (size_t b = 0; b < rows.size(); ++b) {
      if (decodes(rows[b])) part_of[b] = 0;
    }
    parts = 1;
  }
  const bool decode_part = parts == 1;
  std::vector<size_t> widest_first;
  for (size_t b = 0; b < rows.size(); ++b) {
    if (part_of[b] < 0) widest_first.push_back(b);
  }
  std::stable_sort(widest_first.begin(), widest_first.end(),
                   [&](size_t a, size_t b) { return rows[a].tokens > rows[b].tokens; });
  // A row goes with wider ones only while its cached tokens plus the part's width fit the
  // context (the padded positions are written too): a prompt's last piece near the context's
  // end beside a wider new prompt failed the whole step, every other request in it included.
  // The widest row of a part always fits: its own cached plus new tokens do.
  const int64_t capacity = cache->capacity();
  int64_t width = 0, padding = 0;
  for (size_t i = 0; i < widest_first.size(); ++i) {
    const Row& r = rows[widest_first[i]];
    if (i == 0 || padding + (width - r.tokens) > kMaxPaddingTokens ||
        r.seq->computed + width > capacity) {
      width = r.tokens;
      padding = 0;
      ++parts;
    }
    padding += width - r.tokens;
    part_of[widest_first[i]] = parts - 1;
  }
  const auto run = [&](int part, const std::vector<Row>& part_rows,
                       const std::vector<int32_t>& part_slots) {
    return decode_part && part == 0 ? DecodeLogits(part_rows, part_slots, *stack_or)
                                    : PaddedLogits(part_rows, part_slots, *stack_or);
  };
  if (parts == 1) return run(0, rows, slots);
  torch::Tensor out;
  for (int part = 0; part < parts; ++part) {
    std::vector<Row> part_rows;
    std::vector<int32_t> part_slots;
    std::vector<int64_t> index;
    for (size_t b = 0; b < rows.size(); ++b) {
      if (part_of[b] != part) continue;
      part_rows.push_back(rows[b]);
      part_slots.push_back(slots[b]);
      index.push_back(static_cast<int64_t>(b));
    }
    auto logits = run(part, part_rows, part_slots);
    if (!logits.ok()) return logits.status();
    if (!out.defined()) {
      out = torch::empty({static_cast<int64_t>(rows.size()), logits->size(1)}, logits->options());
    }
    // Copied out at once: the decode runner's logits are only valid until its next run.
    out.index_copy_(0, torch::tensor(index, torch::kLong).to(out.device()),
                    logits->to(out.scalar_type()));
  }
  return out;
}

absl::StatusOr<torch::Tensor> InferenceEngine::Impl::DecodeLogits(
    const std::vector<Row>& rows, const std::vector<int32_t>& slots,
    const std::shared_ptr<const LoraStack>& stack) {
  std::vector<DecodeRow> decode(rows.size());
  for (size_t b = 0; b < rows.size(); ++b) {
    const Sequence& s = *rows[b].seq;
    decode[b] = {s.all[s.computed], s.computed, kv->BlockTable(s.id), slots[b]};
  }
  return decoder->Run(decode, stack);
}

absl::StatusOr<torch::Tensor> InferenceEngine::Impl::PaddedLogits(
    const std::vector<Row>& rows, const std::vector<int32_t>& slots,
    const std::shared_ptr<const LoraStack>& stack) {
  const int64_t batch = static_cast<int64_t>(rows.size());
  int64_t width = 0;
  for (const Row& r : rows) width = std::max(width, r.tokens);
  torch::Tensor ids = torch::zeros({batch, width}, torch::kLong);
  auto ids_a = ids.accessor<int64_t, 2>();
  std::vector<int64_t> lengths;
  std::vector<PagedRow> paged;
  for (int64_t b = 0; b < batch; ++b) {
    const Row& r = rows[b];
    for (int64_t t = 0; t < r.tokens; ++t) ids_a[b][t] = r.seq->all[r.seq->computed + t];
    lengths.push_back(r.tokens);
    paged.push_back({kv->BlockTable(r.seq->id), r.seq->computed, r.tokens});
  }
  if (auto s = cache->Bind(std::move(paged)); !s.ok()) return s;
  std::optional<MultiLoraApplier> lora;
  ForwardOptions forward;
  forward.logits = LogitsMode::kLast;
  if (stack != nullptr) {
    lora.emplace(stack, slots, model->options().device);
    forward.lora = &*lora;
  }
  return model->Forward({ids, lengths}, cache.get(), forward);
}

absl::Status InferenceEngine::Impl::RunBatch(const std::vector<Row>& rows,
                                             std::set<RequestId>* finished) {
  try {
    torch::NoGradGuard no_grad;
    const int64_t batch = static_cast<int64_t>(rows.size());
    for (const Row& r : rows) {
      if (r.seq->computed < r.seq->prefill_target) prompt_tokens += r.tokens;
    }
    auto logits = Logits(rows);
    if (!logits.ok()) return logits.status();
    EndPhase(forward_ns);
    for (const Row& r : rows) r.seq->computed += r.tokens;

    std::vector<int64_t> sample_rows;
    std::vector<SampleRow> params;
    std::vector<Sequence*> sampled_seqs;
    for (int64_t b = 0; b < batch; ++b) {
      const Row& r = rows[b];
      if (!r.samples) continue;
      Sequence& s = *r.seq;
      sample_rows.push_back(b);
      SampleRow row;
      row.params = s.request.sampling;
      row.seed = s.seed;
      row.step = s.generated.size();
      row.prompt = s.prompt;
      row.generated = s.generated;
      params.push_back(row);
      sampled_seqs.push_back(&s);
    }
    if (sample_rows.empty()) return absl::OkStatus();
    const torch::Tensor picked =
        static_cast<int64_t>(sample_rows.size()) == batch
            ? *logits
            : logits->index_select(0,
                                   torch::tensor(sample_rows, torch::kLong).to(logits->device()));
    auto tokens = sampler.Sample(picked, params);
    if (!tokens.ok()) return tokens.status();
    EndPhase(sample_ns);
    for (size_t i = 0; i < sampled_seqs.size(); ++i) {
      Accept(*sampled_seqs[i], (*tokens)[i], finished);
    }
    EndPhase(emit_ns);
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("inference step failed: ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("inference step failed: ", e.what()));
  }
}

void InferenceEngine::Impl::Accept(Sequence& seq, const SampledToken& sampled,
                                   std::set<RequestId>* finished) {
  const int32_t token = sampled.token;
  if (token == kNanLogitsToken) {  // this request fails; the batch's others go on
    Finish(seq, FinishReason::kError,
           absl::InternalError("the model's logits for this request are not numbers (NaN): the "
                               "model overflowed in its dtype, or its adapter's weights hold NaN"),
           TokenEvent());
    finished->insert(seq.id);
    return;
  }
  if (seq.generated.empty()) {
    seq.ttft_s = std::chrono::duration<double>(Clock::now() - seq.submitted).count();
  }
  seq.generated.push_back(token);
  seq.all.push_back(token);
  ++generated_tokens;
  TokenEvent event;
  event.token = token;
  if (seq.request.sampling.logprobs > 0) {
    event.logprob = sampled.logprob;
    event.top_logprobs = sampled.top_logprobs;
    for (TokenLogprob& top : event.top_logprobs) {
      top.bytes = tokenizer->TokenBytes(top.token);
      top.text = Utf8Lossy(top.bytes);
    }
  }
  const auto& stop_ids = seq.request.stop_token_ids;
  const bool eos = !seq.request.ignore_eos && tokenizer->IsEos(token);
  const bool stop_token = std::find(stop_ids.begin(), stop_ids.end(), token) != stop_ids.end();
  // A stop token's own text is not output (vLLM's default; the token is, in tokens and usage),
  // also when the token is an EOS too (whose finish reason wins).
  if (!stop_token) event.text = seq.stops->Add(seq.detokenizer->Add(token));

  const FinishReason reason = seq.EndsWith(eos, stop_token, max_sequence);
  if (reason == FinishReason::kNone) {
    Emit(seq, std::move(event));
    return;
  }
  Finish(seq, reason, absl::OkStatus(), std::move(event));
  finished->insert(seq.id);
}

}  // namespace lorad::engine
