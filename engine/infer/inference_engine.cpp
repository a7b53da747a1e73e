// InferenceEngine: submission, cancellation and a step's plan (admission, preemption, removal);
// the step's batch is inference_batch.cpp's.
#include "engine/infer/inference_engine.h"

#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>

#include "absl/strings/str_cat.h"
#include "engine/infer/inference_engine_impl.h"

namespace lorad::engine {

using inference::AdapterKey;
using inference::Clock;
using inference::Row;
using inference::Sequence;

InferenceEngine::InferenceEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

InferenceEngine::~InferenceEngine() = default;

absl::StatusOr<std::unique_ptr<InferenceEngine>> InferenceEngine::Create(
    const LlamaModel* model, const Tokenizer* tokenizer, AdapterStore* adapters,
    const InferenceEngineOptions& options) {
  if (model == nullptr || tokenizer == nullptr) {
    return absl::InvalidArgumentError("the inference engine needs a model and a tokenizer");
  }
  if (options.block_size < 1 || options.max_new_tokens_limit < 1 || options.max_queued < 1 ||
      options.scheduler.max_running < 1 || options.scheduler.token_budget < 1 ||
      options.scheduler.prefill_chunk < 1) {
    return absl::InvalidArgumentError(
        "inference options block_size, max_new_tokens_limit, max_queued, max_running, "
        "token_budget and prefill_chunk must each be >= 1");
  }
  const ModelConfig& c = model->config();
  const auto dtype = model->options().dtype;
  const int64_t per_block = PagedKvCache::BytesPerBlock(c.num_hidden_layers, options.block_size,
                                                        c.num_key_value_heads, c.head_dim, dtype);
  const int64_t blocks =
      options.kv_cache_blocks > 0 ? options.kv_cache_blocks : options.kv_cache_bytes / per_block;
  if (blocks < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_cache_bytes ", options.kv_cache_bytes, " holds no KV block (one block of ",
                     options.block_size, " tokens needs ", per_block, " bytes)"));
  }
  auto impl = std::make_unique<Impl>(model, tokenizer, adapters, options);
  impl->max_context = c.max_position_embeddings > 0 ? c.max_position_embeddings : int64_t{1} << 20;
  impl->kv = std::make_unique<KvBlockAllocator>(static_cast<int32_t>(blocks), options.block_size);
  impl->max_sequence = std::min<int64_t>(impl->max_context, blocks * options.block_size);
  PagedKvCacheOptions p;
  p.num_layers = c.num_hidden_layers;
  p.num_blocks = blocks;
  p.block_size = options.block_size;
  p.kv_heads = c.num_key_value_heads;
  p.head_dim = c.head_dim;
  p.max_context = impl->max_context;
  p.dtype = dtype;
  p.device = model->options().device;
  try {
    impl->cache = std::make_unique<PagedKvCache>(p);
    if (options.paged_decode && DecodeRunner::Supports(*model)) {
      DecodeRunnerOptions d;
      d.cuda_graphs = options.cuda_graphs;
      impl->decoder = std::make_unique<DecodeRunner>(model, impl->cache.get(), d);
    }
  } catch (const c10::Error& e) {
    return absl::ResourceExhaustedError(absl::StrCat("allocating the KV cache (", blocks,
                                                     " blocks, ", blocks * per_block,
                                                     " bytes): ", e.what_without_backtrace()));
  }
  return std::unique_ptr<InferenceEngine>(new InferenceEngine(std::move(impl)));
}

absl::StatusOr<RequestId> InferenceEngine::Submit(GenerationRequest request,
                                                  TokenCallback on_token) {
  Impl& m = *impl_;
  auto seq = std::make_unique<Sequence>();
  seq->prompt =
      request.prompt_ids.empty() ? m.tokenizer->Encode(request.prompt, true) : request.prompt_ids;
  if (request.prompt_ids.empty() && request.prompt.empty()) seq->prompt.clear();
  RequestLimits limits;
  limits.max_new_tokens = m.options.max_new_tokens_limit;
  limits.vocab_size = m.model->config().vocab_size;
  limits.max_context = m.max_context;
  limits.kv_pool_tokens = int64_t{m.kv->num_blocks()} * m.kv->block_size();
  if (auto s = ValidateGenerationRequest(request, seq->prompt, limits); !s.ok()) return s;
  if (!request.adapter.empty()) {
    if (m.adapters == nullptr) {
      return absl::NotFoundError(absl::StrCat("adapter '", request.adapter,
                                              "' is not loaded (this engine serves no adapters)"));
    }
    auto lease = m.adapters->Acquire(request.adapter);
    if (!lease.ok()) return lease.status();
    const int64_t serving = lease->version(), wanted = request.adapter_version;
    if (wanted > serving) {
      return absl::NotFoundError(absl::StrCat("adapter_version: '", request.adapter,
                                              "' has no version ", wanted, "; the newest is ",
                                              serving));
    }
    if (wanted != 0 && wanted < serving) {
      return absl::FailedPreconditionError(
          absl::StrCat("adapter_version: '", request.adapter, "' serves version ", serving,
                       " to new requests; version ", wanted, " is retired (use 0)"));
    }
    seq->lease = *std::move(lease);
  }
  seq->all = seq->prompt;
  seq->prefill_target = static_cast<int64_t>(seq->prompt.size());
  seq->seed = ResolveSeed(request.sampling);
  // The text continues the prompt's: a first word keeps its space (stop strings see it too).
  // A prompt of special tokens alone (a BOS, to generate unconditionally) has no text to
  // continue: the first word loses it, as the tokenizer's decode of the reply (and vLLM) has it.
  const bool continues_text = std::any_of(seq->prompt.begin(), seq->prompt.end(),
                                          [&](int32_t id) { return !m.tokenizer->IsSpecial(id); });
  seq->detokenizer = std::make_unique<IncrementalDetokenizer>(*m.tokenizer, true, continues_text);
  seq->stops = std::make_unique<StopMatcher>(request.stop);
  seq->submitted = Clock::now();
  seq->request = std::move(request);
  seq->on_token = std::move(on_token);
  std::lock_guard<std::mutex> lock(m.mu);
  if (!m.shut_down.empty()) {
    return absl::UnavailableError(absl::StrCat("no new requests: ", m.shut_down));
  }
  if (m.unfinished >= m.options.max_queued) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the engine already has ", m.options.max_queued, " unfinished requests; retry later"));
  }
  seq->id = m.next_id++;
  const RequestId id = seq->id;
  m.submitted.push_back(std::move(seq));
  ++m.unfinished;
  return id;
}

void InferenceEngine::Cancel(RequestId id) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->cancelled.insert(id);
}

void InferenceEngine::Shutdown(const std::string& why) {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    m.shut_down = why.empty() ? "the engine stopped" : why;
  }
  m.DrainInbox();  // every request submitted before the flag was set, and pending cancels
  std::vector<Sequence*> left;
  for (const auto& s : m.running) left.push_back(s.get());
  for (const auto& s : m.waiting) left.push_back(s.get());
  m.FinishAndRemove(left, FinishReason::kCancelled, absl::UnavailableError(m.shut_down));
  m.running_count = 0;
  m.waiting_count = 0;
}

bool InferenceEngine::HasWork() const { return impl_->unfinished > 0; }

InferenceStats InferenceEngine::Stats() const {
  const Impl& m = *impl_;
  InferenceStats s;
  s.running = m.running_count;
  s.waiting = m.waiting_count;
  s.kv_cache_blocks = m.kv->num_blocks();
  s.kv_cache_usage = static_cast<double>(m.used_blocks) / m.kv->num_blocks();
  s.prompt_tokens = m.prompt_tokens;
  s.generated_tokens = m.generated_tokens;
  s.preemptions = m.preemptions;
  s.steps = m.steps;
  s.graph_replays = m.graph_replays;
  s.graphs_captured = m.graphs_captured;
  s.lora_stacks_built = m.lora_stacks_built;
  s.lora_stack_adapters = m.lora_stack_adapters;
  s.lora_stack_bytes = m.lora_stack_bytes;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    s.graph_error = m.graph_error;
  }
  s.plan_s = m.plan_ns * 1e-9;
  s.forward_s = m.forward_ns * 1e-9;
  s.sample_s = m.sample_ns * 1e-9;
  s.emit_s = m.emit_ns * 1e-9;
  return s;
}

void InferenceEngine::Impl::DrainInbox() {
  std::vector<std::unique_ptr<Sequence>> fresh;
  std::set<RequestId> cancel;
  {
    std::lock_guard<std::mutex> lock(mu);
    fresh.swap(submitted);
    cancel.swap(cancelled);
  }
  for (auto& seq : fresh) waiting.push_back(std::move(seq));
  const auto now = Clock::now();
  std::vector<Sequence*> to_cancel, expired, unloaded;
  auto check = [&](const std::unique_ptr<Sequence>& s) {
    if (cancel.count(s->id)) {
      to_cancel.push_back(s.get());
    } else if (now > s->request.deadline) {
      expired.push_back(s.get());
    } else if (s->queue_s < 0 && s->lease.unloaded()) {
      // Never admitted: an operator who unloads an adapter wants it gone, not minutes more of
      // its output from the queue. Running requests finish on it.
      unloaded.push_back(s.get());
    }
  };
  for (const auto& s : running) check(s);
  for (const auto& s : waiting) check(s);
  FinishAndRemove(to_cancel, FinishReason::kCancelled, absl::CancelledError("cancelled"));
  FinishAndRemove(expired, FinishReason::kCancelled,
                  absl::DeadlineExceededError("the request's deadline passed"));
  for (Sequence* s : unloaded) {
    FinishAndRemove({s}, FinishReason::kCancelled,
                    absl::FailedPreconditionError(absl::StrCat(
                        "adapter '", s->lease.name(), "' version ", s->lease.version(),
                        " was unloaded before this request started; send it again to be served "
                        "by the adapter's current version, if it has one")));
  }
}

void InferenceEngine::Impl::Emit(Sequence& seq, TokenEvent event) {
  event.id = seq.id;
  if (!seq.on_token) return;
  try {
    seq.on_token(event);
  } catch (...) {
    // A throwing callback must not take the loop down; the request still finishes normally.
  }
}

void InferenceEngine::Impl::Finish(Sequence& seq, FinishReason reason, absl::Status status,
                                   TokenEvent event) {
  // Held-back text goes out unless a stop string ended the text (it is dropped from there on).
  if (reason == FinishReason::kLength || reason == FinishReason::kEos ||
      (reason == FinishReason::kStop && !seq.stops->stopped())) {
    event.text += seq.stops->Add(seq.detokenizer->Finish());
    event.text += seq.stops->Flush();
    // The held-back text completed a stop string: the text ends there, so that is the reason.
    if (seq.stops->stopped() && reason != FinishReason::kStop) reason = FinishReason::kStop;
  }
  event.finished = true;
  event.finish_reason = reason;
  event.status = std::move(status);
  event.usage.prompt_tokens = static_cast<int64_t>(seq.prompt.size());
  event.usage.completion_tokens = static_cast<int64_t>(seq.generated.size());
  event.usage.time_to_first_token_s = seq.ttft_s;
  // Never admitted (cancelled, out of time or failed while waiting): it queued its whole life.
  event.usage.queue_time_s =
      seq.queue_s >= 0 ? seq.queue_s
                       : std::chrono::duration<double>(Clock::now() - seq.submitted).count();
  event.usage.preemptions = seq.preemptions;
  event.usage.adapter_version = seq.lease.valid() ? seq.lease.version() : 0;
  Emit(seq, std::move(event));
}

void InferenceEngine::Impl::Remove(const std::set<RequestId>& ids) {
  if (ids.empty()) return;
  auto done = [&](const std::unique_ptr<Sequence>& s) {
    if (!ids.count(s->id)) return false;
    kv->Release(s->id);
    if (s->device != nullptr) adapter_released = true;
    s->lease.Release();  // may free a retired adapter version
    --unfinished;
    return true;
  };
  running.erase(std::remove_if(running.begin(), running.end(), done), running.end());
  waiting.erase(std::remove_if(waiting.begin(), waiting.end(), done), waiting.end());
}

void InferenceEngine::Impl::FinishAndRemove(std::vector<Sequence*> seqs, FinishReason reason,
                                            const absl::Status& st) {
  std::set<RequestId> ids;
  for (Sequence* s : seqs) {
    Finish(*s, reason, st, TokenEvent());
    ids.insert(s->id);
  }
  Remove(ids);
}

absl::Status InferenceEngine::Step() {
  Impl& m = *impl_;
  ++m.steps;
  m.phase_start = Clock::now();
  m.DrainInbox();
  std::vector<ScheduledSequence> running, waiting;
  for (const auto& s : m.running) {
    running.push_back(
        {s->id, s->adapter_key(), s->prefill_target, s->computed, 0, s->request.client});
  }
  for (const auto& s : m.waiting) {
    waiting.push_back({s->id, s->adapter_key(), s->prefill_target, s->computed, s->passed_over,
                       s->request.client, s->preemptions > 0});
  }
  const StepPlan plan = PlanStep(running, waiting, *m.kv, m.options.scheduler);
  if (!plan.passed_over.empty()) {  // one pass over the queue (up to max_queued requests)
    const std::set<SequenceId> passed(plan.passed_over.begin(), plan.passed_over.end());
    for (auto& s : m.waiting) {
      if (passed.count(s->id) > 0) ++s->passed_over;
    }
  }

  // Preempted: free the blocks; recompute prompt + generated when readmitted, in arrival order at
  // the front of the queue.
  std::vector<std::unique_ptr<Sequence>> preempted;
  for (SequenceId id : plan.preempted) {
    auto it = std::find_if(m.running.begin(), m.running.end(),
                           [&](const auto& s) { return s->id == id; });
    if (it == m.running.end()) continue;
    Sequence& s = **it;
    m.kv->Release(id);
    s.computed = 0;
    s.prefill_target = static_cast<int64_t>(s.all.size());
    s.lease.Deactivate();
    if (s.device != nullptr) m.adapter_released = true;
    s.device = nullptr;
    ++s.preemptions;
    ++m.preemptions;
    preempted.push_back(std::move(*it));
    m.running.erase(it);
  }
  for (auto it = preempted.rbegin(); it != preempted.rend(); ++it) {
    m.waiting.push_front(std::move(*it));
  }

  // Admitted: make the adapter resident; one that cannot be yet (every slot in use) waits. One
  // whose copy to the device failed (its memory) ends with the error: tried again every step, it
  // waited for ever without a word.
  std::set<SequenceId> refused;
  std::vector<std::pair<Sequence*, absl::Status>> not_resident;
  for (SequenceId id : plan.admitted) {
    auto it = std::find_if(m.waiting.begin(), m.waiting.end(),
                           [&](const auto& s) { return s->id == id; });
    if (it == m.waiting.end()) continue;
    Sequence& s = **it;
    if (s.lease.valid()) {
      auto device = s.lease.Activate();
      if (!device.ok()) {
        refused.insert(id);
        if (!absl::IsUnavailable(device.status())) not_resident.push_back({&s, device.status()});
        continue;
      }
      s.device = *device;
    }
    if (s.queue_s < 0)
      s.queue_s = std::chrono::duration<double>(Clock::now() - s.submitted).count();
    m.running.push_back(std::move(*it));
    m.waiting.erase(it);
  }
  for (const auto& [s, status] : not_resident) m.FinishAndRemove({s}, FinishReason::kError, status);
  std::sort(m.running.begin(), m.running.end(),
            [](const auto& a, const auto& b) { return a->id < b->id; });

  // The rows of this step: decodes, then prefill chunks.
  std::map<SequenceId, Sequence*> by_id;
  for (auto& s : m.running) by_id[s->id] = s.get();
  std::vector<Row> rows;
  std::set<RequestId> finished;
  std::vector<Sequence*> failed;
  auto add_row = [&](SequenceId id, int64_t tokens) {
    auto it = by_id.find(id);
    if (it == by_id.end() || refused.count(id)) return;
    Sequence& s = *it->second;
    // A prefill holds the blocks of its whole prompt and first token from its first piece on, as
    // the plan counted them at admission: blocks taken piece by piece could go to the decoders
    // meanwhile, and a pool full of half-prefilled sequences moved no more.
    const int64_t hold = s.computed < s.prefill_target
                             ? std::max(s.computed + tokens, s.prefill_target + 1)
                             : s.computed + tokens;
    if (auto st = m.kv->Reserve(id, hold); !st.ok()) {
      failed.push_back(&s);  // the plan said it fits; never expected
      return;
    }
    const bool samples = s.computed + tokens >= s.prefill_target;
    rows.push_back({&s, tokens, samples});
  };
  for (SequenceId id : plan.decode) add_row(id, 1);
  for (const auto& [id, tokens] : plan.prefill) add_row(id, tokens);
  // Rows of one adapter side by side: the LoRA kernels share each adapter's weights across a run
  // of consecutive rows, so a batch mixing 4 adapters costs about what one adapter costs.
  std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
    return a.seq->adapter_order() < b.seq->adapter_order();
  });
  m.FinishAndRemove(failed, FinishReason::kError,
                    absl::InternalError("KV cache reservation failed after planning"));

  absl::Status status = absl::OkStatus();
  m.EndPhase(m.plan_ns);
  if (!rows.empty()) {
    status = m.RunBatch(rows, &finished);
    if (!status.ok()) {
      std::vector<Sequence*> batch;
      for (const Row& r : rows) {
        if (!finished.count(r.seq->id)) batch.push_back(r.seq);
      }
      m.Remove(finished);
      m.FinishAndRemove(batch, FinishReason::kError, status);
      finished.clear();
    }
  }
  m.Remove(finished);
  // A request that ends may leave a stale copy in the stack unused (its version unloaded or
  // replaced while it ran): dropped now, not at the next retire signal, which may never come.
  if (m.running.empty() || m.adapter_released) m.KeepStackWhileCurrent();
  m.adapter_released = false;
  m.UpdateCounts();
  return status;
}

void InferenceEngine::ReleaseIdleAdapters() { impl_->KeepStackWhileCurrent(); }

void InferenceEngine::Impl::KeepStackWhileCurrent() {
  if (stack == nullptr) return;
  // Idle: the next request on the same adapters (a user's next chat turn) finds the stack and
  // its decode graphs ready, instead of waiting for a copy of every adapter matrix before its
  // first token and a graph capture before its second. Copies of a version that is no longer
  // current or no longer resident (replaced, unloaded, evicted) are dropped here; the store
  // frees its own copy when the version's last request ends.
  std::set<std::string> current;
  if (adapters != nullptr) {
    for (const auto& [name, version] : adapters->CurrentResident()) {
      current.insert(AdapterKey(name, version));
    }
  }
  // While requests run, a stale copy goes once none of them uses it (base-model requests could
  // otherwise keep an unloaded adapter on the device for ever); running requests on the stack's
  // other adapters get a new stack at their next step.
  std::set<std::string> in_use;
  for (const auto& seq : running) {
    if (seq->device != nullptr) in_use.insert(seq->adapter_key());
  }
  for (const std::string& key : stack_key) {
    if (current.count(key) == 0 && in_use.count(key) == 0) {
      if (decoder != nullptr) decoder->DropAdapterGraphs();  // they hold the stack too
      stack.reset();
      stack_key.clear();
      lora_stack_adapters = 0;
      lora_stack_bytes = 0;
      return;
    }
  }
}

}  // namespace lorad::engine
