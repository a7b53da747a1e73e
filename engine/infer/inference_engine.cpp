#include "engine/infer/inference_engine.h"

#include <torch/cuda.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "engine/infer/decode_runner.h"
#include "engine/infer/inference_sequence.h"
#include "engine/infer/kv_block_allocator.h"
#include "engine/infer/paged_kv_cache.h"
#include "engine/infer/stop_matcher.h"
#include "engine/lora/adapter_store.h"
#include "engine/lora/multi_lora_applier.h"
#include "engine/model/incremental_detokenizer.h"
#include "engine/model/llama_model.h"
#include "engine/model/tokenizer.h"
#include "engine/model/utf8.h"

namespace lorad::engine {

using inference::AdapterKey;
using inference::Clock;
using inference::Row;
using inference::Sequence;

struct InferenceEngine::Impl {
  const LlamaModel* model;
  const Tokenizer* tokenizer;
  AdapterStore* adapters;
  InferenceEngineOptions options;
  int64_t max_context = 0;  // the model's: prompt and new tokens together
  // Tokens one sequence may hold: the model's context, or the whole KV pool when that is smaller.
  // A sequence ends with kLength there (as at the model's context): one that outgrew the pool
  // could never be admitted again, and the requests queued behind it would wait for ever.
  int64_t max_sequence = 0;
  Sampler sampler;

  // Inbox: any thread.
  mutable std::mutex mu;
  std::vector<std::unique_ptr<Sequence>> submitted;
  std::set<RequestId> cancelled;
  RequestId next_id = 1;
  std::atomic<int64_t> unfinished{0};
  std::atomic<int32_t> running_count{0};
  std::atomic<int32_t> waiting_count{0};
  std::atomic<int64_t> prompt_tokens{0};
  std::atomic<int64_t> generated_tokens{0};
  std::atomic<int64_t> preemptions{0};
  std::atomic<int64_t> steps{0};
  std::atomic<int32_t> used_blocks{0};
  std::atomic<int64_t> graph_replays{0};
  std::atomic<int64_t> graphs_captured{0};
  std::atomic<int64_t> lora_stacks_built{0};
  std::atomic<int32_t> lora_stack_adapters{0};
  std::atomic<int64_t> lora_stack_bytes{0};
  std::string graph_error;  // under mu
  std::string shut_down;    // under mu: why Submit refuses (Shutdown), empty while serving
  // profile_phases: nanoseconds per phase, summed; `phase_start` is when the current phase began.
  std::atomic<int64_t> plan_ns{0}, forward_ns{0}, sample_ns{0}, emit_ns{0};
  Clock::time_point phase_start;

  // Loop thread only.
  std::deque<std::unique_ptr<Sequence>> waiting;   // arrival order
  std::vector<std::unique_ptr<Sequence>> running;  // arrival (id) order
  std::unique_ptr<KvBlockAllocator> kv;
  std::unique_ptr<PagedKvCache> cache;
  std::unique_ptr<DecodeRunner> decoder;  // null: decode steps run through Forward
  std::vector<std::string> stack_key;     // the adapters `stack` was built for
  std::shared_ptr<const LoraStack> stack;

  Impl(const LlamaModel* m, const Tokenizer* t, AdapterStore* a, const InferenceEngineOptions& o)
      : model(m), tokenizer(t), adapters(a), options(o), sampler(o.logprobs_mode) {
    // A batch never names more adapters than can be resident at once: a request admitted beyond
    // that could not be made resident while the others run, and waited for ever.
    if (a != nullptr) {
      options.scheduler.max_adapters_per_batch =
          std::min(options.scheduler.max_adapters_per_batch, a->max_resident());
    }
  }

  void DrainInbox();
  void Emit(Sequence& seq, TokenEvent event);
  void Finish(Sequence& seq, FinishReason reason, absl::Status status, TokenEvent event);
  // Removes finished sequences (by id) from running and waiting, releasing their memory.
  void Remove(const std::set<RequestId>& ids);
  void FinishAndRemove(std::vector<Sequence*> seqs, FinishReason reason, const absl::Status& st);
  absl::Status RunBatch(const std::vector<Row>& rows, std::set<RequestId>* finished);
  // The step's logits [rows, vocab] at each row's last new token.
  absl::StatusOr<torch::Tensor> Logits(const std::vector<Row>& rows);
  // Logits for rows that each bring one token and sample (the decode runner) and for any rows
  // (the padded forward: every row as wide as the widest); slots[b] is row b's adapter slot.
  absl::StatusOr<torch::Tensor> DecodeLogits(const std::vector<Row>& rows,
                                             const std::vector<int32_t>& slots,
                                             const std::shared_ptr<const LoraStack>& stack);
  absl::StatusOr<torch::Tensor> PaddedLogits(const std::vector<Row>& rows,
                                             const std::vector<int32_t>& slots,
                                             const std::shared_ptr<const LoraStack>& stack);
  void Accept(Sequence& seq, const SampledToken& sampled, std::set<RequestId>* finished);
  // Keeps the stack (and its decode graphs) while every adapter in it is the current, resident
  // version of its name or in use by a running request; drops both otherwise.
  void KeepStackWhileCurrent();
  // A sequence holding an adapter on the device left or was preempted since the last check.
  bool adapter_released = false;
  absl::StatusOr<std::shared_ptr<const LoraStack>> StackFor(const std::vector<Row>& rows,
                                                            std::vector<int32_t>* slots);
  // Ends the current phase: adds its time to `total` (after waiting for the device's queued
  // work, so the time is the phase's own) and starts the next one.
  void EndPhase(std::atomic<int64_t>& total) {
    if (!options.profile_phases) return;
    if (model->options().device.is_cuda()) torch::cuda::synchronize();
    const Clock::time_point now = Clock::now();
    total += std::chrono::duration_cast<std::chrono::nanoseconds>(now - phase_start).count();
    phase_start = now;
  }
  void UpdateCounts() {
    if (decoder != nullptr) {
      graph_replays = decoder->graph_replays();
      graphs_captured = decoder->graphs_captured();
      if (!decoder->graph_error().empty() && graph_error.empty()) {  // written by this thread
        std::lock_guard<std::mutex> lock(mu);
        graph_error = decoder->graph_error();
        if (options.on_warning) options.on_warning(graph_error);
      }
    }
    running_count = static_cast<int32_t>(running.size());
    waiting_count = static_cast<int32_t>(waiting.size());
    used_blocks = kv->num_blocks() - kv->free_blocks();
  }
};

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
