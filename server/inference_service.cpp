#include "server/inference_service.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/model/tokenizer.h"
#include "engine/model/utf8.h"
#include "server/call_authorizer.h"
#include "server/grpc_status.h"
#include "server/log_limiter.h"
#include "spdlog/spdlog.h"

namespace lorad::server {
namespace {

using lorad::v1::GenerateChunk;
using Clock = std::chrono::steady_clock;

// The most output one stream message merges (by GenerateStream's count, a little above its
// serialized size), well under the 4 MiB a gRPC client receives by default.
constexpr int64_t kMaxChunkBytes = int64_t{1} << 20;

lorad::v1::FinishReason ToProto(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kLength:
      return lorad::v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kStop:
      return lorad::v1::FINISH_REASON_STOP;
    case engine::FinishReason::kEos:
      return lorad::v1::FINISH_REASON_EOS;
    case engine::FinishReason::kCancelled:
      return lorad::v1::FINISH_REASON_CANCELLED;
    case engine::FinishReason::kError:
      return lorad::v1::FINISH_REASON_ERROR;
    case engine::FinishReason::kNone:
      break;
  }
  return lorad::v1::FINISH_REASON_UNSPECIFIED;
}

// A double for a float field, rounded toward zero but never to zero: a value inside a range
// like (0, 1] or [0, 1) stays inside it (1e-300 for top_p, 0.999999999999 for min_p), and a huge
// finite one stays finite.
float Narrow(double v) {
  if (!std::isfinite(v)) return static_cast<float>(v);
  float f = static_cast<float>(v);
  if (std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);
  if (v != 0 && f == 0) f = std::copysign(std::numeric_limits<float>::denorm_min(), v);
  return f;
}

// The engine's request for the proto's sampling fields, the model's defaults for those left unset;
// range checks are the engine's (SamplingParams::Validate names the field). Filters (top_k, top_p,
// min_p) without a temperature on a model whose default is greedy are refused: they would do
// nothing (transformers only warns; OpenAI-style clients expect a temperature of 1 there). A
// seed alone is harmless: a client may send one with every request.
absl::StatusOr<engine::GenerationRequest> FromProto(const lorad::v1::SamplingParams& p,
                                                    const InferenceOptions& options) {
  engine::GenerationRequest r;
  engine::SamplingParams& s = r.sampling;
  s = options.defaults.sampling;
  // Unset: the default, within the configured limit (a limit below it must not refuse requests
  // that never asked for more).
  s.max_new_tokens =
      p.max_new_tokens() != 0
          ? p.max_new_tokens()
          : std::min(options.defaults.max_new_tokens.value_or(options.default_max_new_tokens),
                     options.max_new_tokens);
  if (p.has_temperature()) s.temperature = Narrow(p.temperature());
  if (p.has_top_k()) s.top_k = p.top_k();
  if (p.has_top_p()) s.top_p = Narrow(p.top_p());
  if (p.has_min_p()) s.min_p = Narrow(p.min_p());
  if (p.has_repetition_penalty()) s.repetition_penalty = Narrow(p.repetition_penalty());
  s.presence_penalty = Narrow(p.presence_penalty());
  s.frequency_penalty = Narrow(p.frequency_penalty());
  if (p.has_seed()) s.seed = p.seed();
  s.logprobs = p.logprobs();
  r.stop.assign(p.stop().begin(), p.stop().end());
  r.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  r.ignore_eos = p.ignore_eos();
  if (!p.has_temperature() && s.temperature == 0) {
    // A filter given at its off value (top_k 0, top_p 1, min_p 0) asks for nothing.
    for (const auto& [given, name] : {std::pair{p.has_top_k() && p.top_k() != 0, "top_k"},
                                      std::pair{p.has_top_p() && p.top_p() != 1, "top_p"},
                                      std::pair{p.has_min_p() && p.min_p() != 0, "min_p"}}) {
      if (!given) continue;
      return absl::InvalidArgumentError(absl::StrCat(
          "sampling.", name,
          ": takes effect only when sampling, and the temperature is unset while the model's "
          "default is greedy; set sampling.temperature > 0 to sample (0 for greedy)"));
    }
  }
  return r;
}

// One Generate/Chat stream. The engine's callback holds the shared State, never the reactor:
// events may still arrive after gRPC is done with the reactor (OnDone clears `reactor`).
class GenerateStream : public grpc::ServerWriteReactor<GenerateChunk> {
 public:
  struct State {
    std::mutex mu;
    GenerateStream* reactor = nullptr;  // null once OnDone ran
    // Events not yet handed to gRPC, merged into chunks of about kMaxChunkBytes at most, with
    // each chunk's bytes (as unread_bytes counts them): one chunk of everything a slow client
    // had not read grew past the 4 MiB that gRPC clients receive by default, and its stream
    // failed there (RESOURCE_EXHAUSTED on the client) short of limits.max_unread_stream_bytes.
    std::deque<std::pair<GenerateChunk, int64_t>> pending;
    bool final_queued = false;   // the last event is in `pending` or written
    bool final_written = false;  // ... and has been handed to StartWrite
    bool writing = false;
    bool finished = false;  // Finish was called
    GenerateChunk current;  // the chunk being written (must outlive StartWrite)
    grpc::Status end_status;
    std::string adapter;
    Clock::time_point submitted = Clock::now();
    Clock::time_point last_token;
    bool seen_token = false;
    // Output not yet handed to gRPC (about, in bytes), and its limit: past it the stream ends
    // RESOURCE_EXHAUSTED (`overflowed`) and later events are dropped.
    int64_t unread_bytes = 0;
    int64_t max_unread_bytes = 0;
    bool overflowed = false;
    GenerateChunk dropped;  // where an overflowed stream's events go
    // Streams whose request finished and whose call is not done yet (their client has not read
    // them all): InferenceService's count, and whether this one is in it.
    std::shared_ptr<std::atomic<int64_t>> finished_unread;
    bool counted_unread = false;
  };

  // `slot`: this stream's place among the open ones (none when it is refused for want of one);
  // `client_slot` among its client's (none without limits.max_streams_per_client).
  GenerateStream(engine::Engine& engine, InferenceService::Metrics& metrics,
                 std::chrono::steady_clock::time_point deadline,
                 std::optional<OpenCalls::Slot> slot,
                 std::optional<OpenCallsPerKey::Slot> client_slot, int64_t max_unread_bytes,
                 std::shared_ptr<std::atomic<int64_t>> finished_unread)
      : engine_(engine),
        metrics_(metrics),
        state_(std::make_shared<State>()),
        call_deadline_(deadline),
        slot_(std::move(slot)),
        client_slot_(std::move(client_slot)) {
    state_->reactor = this;
    state_->max_unread_bytes = max_unread_bytes;
    state_->finished_unread = std::move(finished_unread);
  }

  void Begin(absl::StatusOr<engine::GenerationRequest> request) {
    if (!request.ok()) {
      FinishWith(ToGrpcStatus(request.status()));
      return;
    }
    state_->adapter = request->adapter;
    std::shared_ptr<State> state = state_;
    InferenceService::Metrics* metrics = &metrics_;
    engine::Engine* engine = &engine_;
    auto id = engine_.Generate(std::move(*request),
                               [state, metrics, engine](const engine::TokenEvent& e) {
                                 // Outside the stream's lock, as Begin and OnCancel cancel.
                                 if (OnEvent(*state, *metrics, e)) engine->Cancel(e.id);
                               });
    if (!id.ok()) {
      FinishWith(ToGrpcStatus(id.status()));
      return;
    }
    bool cancelled = false;
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      id_ = *id;
      submitted_ = true;
      cancelled = cancelled_;
    }
    // Outside the lock (the engine's loop may hold its own while it calls OnEvent), and through
    // copies (after a cancel, OnDone may already have deleted this).
    if (cancelled) engine->Cancel(*id);
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->writing = false;
      if (ok) {
        WriteNextLocked(*state_);
        return;
      }
    }
    OnCancel();  // the client went away
  }

  void OnCancel() override {
    // Copies: once Finish is called, OnDone may delete this on another thread.
    engine::Engine* engine = &engine_;
    bool submitted = false;
    engine::RequestId id = 0;
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      cancelled_ = true;
      submitted = submitted_;
      id = id_;
      FinishLocked(*state_, CancelledCallStatus(call_deadline_));
    }
    if (submitted) engine->Cancel(id);
  }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->reactor = nullptr;
      if (state_->counted_unread) --*state_->finished_unread;
      state_->counted_unread = false;
    }
    delete this;
  }

 private:
  // Returns true when the request should be cancelled: its client fell too far behind.
  static bool OnEvent(State& s, InferenceService::Metrics& m, const engine::TokenEvent& e) {
    const Clock::time_point now = Clock::now();
    std::lock_guard<std::mutex> lock(s.mu);
    int64_t bytes = static_cast<int64_t>(e.text.size()) + (e.token ? 16 : 0);
    for (const auto& top : e.top_logprobs) {
      bytes += static_cast<int64_t>(top.text.size() + top.bytes.size()) + 24;
    }
    if (!s.overflowed && (s.pending.empty() || s.pending.back().second >= kMaxChunkBytes)) {
      s.pending.emplace_back();
    }
    GenerateChunk& out = s.overflowed ? s.dropped : s.pending.back().first;
    if (!s.overflowed) s.pending.back().second += bytes;
    if (e.token) {
      if (s.seen_token) {
        m.inter_token_latency.Observe({},
                                      std::chrono::duration<double>(now - s.last_token).count());
      }
      s.seen_token = true;
      s.last_token = now;
      auto* info = out.add_tokens();
      info->set_token_id(*e.token);
      if (e.logprob) info->set_logprob(*e.logprob);
      for (const auto& top : e.top_logprobs) {
        auto* t = info->add_top_logprobs();
        t->set_token_id(top.token);
        t->set_token(top.text);
        t->set_token_bytes(top.bytes);
        t->set_logprob(top.logprob);
      }
    }
    out.mutable_text()->append(e.text);
    if (e.finished) {
      out.set_finish_reason(ToProto(e.finish_reason));
      auto* usage = out.mutable_usage();
      usage->set_prompt_tokens(static_cast<int32_t>(e.usage.prompt_tokens));
      usage->set_completion_tokens(static_cast<int32_t>(e.usage.completion_tokens));
      usage->set_time_to_first_token_seconds(e.usage.time_to_first_token_s);
      const double total = std::chrono::duration<double>(now - s.submitted).count();
      usage->set_total_seconds(total);
      out.set_adapter(s.adapter);
      out.set_adapter_version(e.usage.adapter_version);
      if (!e.status.ok()) out.set_error(engine::Utf8Lossy(std::string(e.status.message())));
      s.final_queued = true;
      if (s.reactor != nullptr && s.finished_unread != nullptr) {
        ++*s.finished_unread;
        s.counted_unread = true;
      }
      // An error, or a deadline the engine saw pass before gRPC did: the call's status says so
      // (a client cancel has an OK status here and the call is finished already).
      if (!e.status.ok()) s.end_status = ToGrpcStatus(e.status);
      if (e.finish_reason == engine::FinishReason::kError) LogError(s, e);
      m.e2e_latency.Observe({}, total);
      m.queue_time.Observe({}, e.usage.queue_time_s);
      if (e.usage.completion_tokens > 0) {
        m.time_to_first_token.Observe({}, e.usage.time_to_first_token_s);
      }
      m.prompt_tokens.Inc({}, static_cast<double>(e.usage.prompt_tokens));
      m.generation_tokens.Inc({}, static_cast<double>(e.usage.completion_tokens));
      m.requests.Inc({s.adapter, engine::FinishReasonName(e.finish_reason)});
    }
    s.dropped.Clear();
    if (s.overflowed) return false;
    s.unread_bytes += bytes;
    if (!e.finished && s.unread_bytes > s.max_unread_bytes) {
      // The client stopped reading (or reads slower than the model writes): what it has not
      // read is dropped and the stream ends, rather than held in memory without bound.
      s.overflowed = true;
      s.pending.clear();
      FinishLocked(s, grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                   absl::StrCat("the client did not read this stream's output: "
                                                "more than ",
                                                s.max_unread_bytes,
                                                " bytes waited (limits.max_unread_stream_bytes); "
                                                "the request was cancelled")));
      return true;
    }
    WriteNextLocked(s);
    return false;
  }

  // A request the engine ended with an error (a failed forward, an adapter that could not be
  // copied to the device, ...): the client has the message, and the operator who sees
  // lorad_request_success_total{finished_reason="error"} rise finds it here. A failed step ends
  // every request of its batch, hence the limit.
  static void LogError(const State& s, const engine::TokenEvent& e) {
    static LogLimiter limiter(std::chrono::seconds(10));
    const std::string message(e.status.message());
    const std::string line = absl::StrCat(
        "a generation request",
        s.adapter.empty() ? "" : absl::StrCat(" on adapter '", s.adapter, "'"),
        " ended with an error after ", e.usage.completion_tokens, " token(s): ", message);
    if (auto held = limiter.Allow(absl::StrCat(s.adapter, "|", message), line)) {
      spdlog::warn("{}{}", line, LogLimiter::HeldBack(*held));
    }
  }

  static void WriteNextLocked(State& s) {
    if (s.reactor == nullptr || s.writing || s.finished) return;
    if (!s.pending.empty()) {
      s.current = std::move(s.pending.front().first);
      // Handed to gRPC, whose own buffers are bounded by flow control.
      s.unread_bytes -= s.pending.front().second;
      s.pending.pop_front();
      if (s.final_queued && s.pending.empty()) s.final_written = true;
      s.writing = true;
      s.reactor->StartWrite(&s.current);
      return;
    }
    if (s.final_written) FinishLocked(s, s.end_status);
  }

  static void FinishLocked(State& s, const grpc::Status& status) {
    if (s.finished || s.reactor == nullptr) return;
    s.finished = true;
    s.reactor->Finish(status);
  }

  void FinishWith(const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(state_->mu);
    FinishLocked(*state_, status);
  }

  engine::Engine& engine_;
  InferenceService::Metrics& metrics_;
  std::shared_ptr<State> state_;
  engine::RequestId id_ = 0;
  bool submitted_ = false;                               // guarded by state_->mu
  bool cancelled_ = false;                               // guarded by state_->mu
  std::chrono::steady_clock::time_point call_deadline_;  // max() when the client set none
  std::optional<OpenCalls::Slot> slot_;
  std::optional<OpenCallsPerKey::Slot> client_slot_;
};

// The deadline of the call, on the engine's clock; none when the client set none.
Clock::time_point DeadlineOf(const grpc::CallbackServerContext* context) {
  const Clock::time_point deadline = CallDeadline(*context);
  if (deadline - Clock::now() > std::chrono::hours(24 * 365)) return Clock::time_point::max();
  return deadline;
}

// The request's own checks; whether that version serves is the engine's to say, as it pins the
// adapter (a version checked here could be replaced before the request reached the engine).
absl::Status CheckAdapterVersion(const std::string& name, int64_t version) {
  if (version == 0) return absl::OkStatus();
  if (name.empty()) return absl::InvalidArgumentError("adapter_version: set without adapter");
  if (version < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter_version: ", version, " is negative (0 = the current version)"));
  }
  return absl::OkStatus();
}

}  // namespace

InferenceService::InferenceService(engine::Engine& engine, MetricsRegistry& metrics,
                                   InferenceOptions options, const TokenAuthenticator* auth)
    : engine_(engine),
      options_(std::move(options)),
      auth_(auth),
      metrics_{
          metrics.AddHistogram("lorad_time_to_first_token_seconds",
                               "Time from submission to the first generated token", {},
                               LatencyBucketsSeconds()),
          metrics.AddHistogram("lorad_inter_token_latency_seconds",
                               "Time between consecutive generated tokens of a request", {},
                               LatencyBucketsSeconds()),
          metrics.AddHistogram("lorad_e2e_request_latency_seconds",
                               "Time from submission to the last token of a request", {},
                               LatencyBucketsSeconds()),
          metrics.AddHistogram("lorad_request_queue_time_seconds",
                               "Time a request waited before it joined the running batch", {},
                               LatencyBucketsSeconds()),
          metrics.AddCounter("lorad_prompt_tokens_total", "Prompt tokens of finished requests"),
          metrics.AddCounter("lorad_generation_tokens_total",
                             "Tokens generated by finished requests"),
          metrics.AddCounter("lorad_request_success_total",
                             "Finished generation requests by adapter and finish reason",
                             {"adapter", "finished_reason"})},
      open_streams_(options_.max_open_streams),
      client_streams_(options_.max_streams_per_client > 0
                          ? std::make_unique<OpenCallsPerKey>(options_.max_streams_per_client)
                          : nullptr) {}

grpc::ServerWriteReactor<GenerateChunk>* InferenceService::Start(
    grpc::CallbackServerContext* context, absl::StatusOr<engine::GenerationRequest> request) {
  std::optional<OpenCalls::Slot> slot = open_streams_.TryTake();
  if (!slot && request.ok()) {
    // What holds the places: requests decoding and waiting (as of the engine's last step; one
    // just submitted is in neither yet), and finished streams whose clients have not read them.
    const engine::EngineStats stats = engine_.Stats();
    const int64_t unread = finished_unread_->load();
    const int64_t just_submitted = std::max<int64_t>(
        0, open_streams_.limit() - unread - stats.inference.running - stats.inference.waiting);
    request = absl::ResourceExhaustedError(absl::StrCat(
        open_streams_.limit(), " generation streams are open (limits.max_queued_requests): ",
        stats.inference.running, " decoding, ", stats.inference.waiting, " waiting",
        just_submitted > 0 ? absl::StrCat(", ", just_submitted, " just submitted") : "",
        unread > 0 ? absl::StrCat(", ", unread, " finished but not yet read by their clients") : "",
        "; retry later"));
  }
  std::optional<OpenCallsPerKey::Slot> client_slot;
  if (request.ok() && client_streams_) {
    int64_t open = 0;
    if (auto taken = client_streams_->TryTake(request->client, &open)) {
      client_slot.emplace(*std::move(taken));
    } else {
      slot.reset();  // its place goes to other clients
      request = absl::ResourceExhaustedError(absl::StrCat(
          "this client (", request->client, ") has ", open,
          " generation streams open, the most one client may (limits.max_streams_per_client); "
          "retry when one of them has ended"));
    }
  }
  auto* stream = new GenerateStream(engine_, metrics_, CallDeadline(*context), std::move(slot),
                                    std::move(client_slot), options_.max_unread_stream_bytes,
                                    finished_unread_);
  if (request.ok()) {
    request->deadline = DeadlineOf(context);
    // A stop string that is a special token's text (<|eot_id|>) never reaches the decoded text
    // (special tokens are not sent): it stops at that token instead.
    const engine::Tokenizer& tokenizer = engine_.tokenizer();
    for (const std::string& stop : request->stop) {
      if (auto id = tokenizer.IdOf(stop); id && tokenizer.IsSpecial(*id)) {
        request->stop_token_ids.push_back(*id);
        ++request->added_stop_token_ids;
      }
    }
  }
  stream->Begin(std::move(request));
  return stream;
}

absl::Status InferenceService::Authorize(const grpc::CallbackServerContext* context,
                                         std::string* client) const {
  client->clear();
  if (auth_ != nullptr) {
    if (auto s = AuthorizeCall(*auth_, *context, Role::kUser, "", client); !s.ok()) return s;
  }
  if (client->empty()) *client = context->peer();
  return absl::OkStatus();
}

void InferenceService::ForgetAdapter(const std::string& name) {
  metrics_.requests.RemoveWhere(0, name);  // labels: adapter, finished_reason
}

grpc::ServerWriteReactor<GenerateChunk>* InferenceService::Generate(
    grpc::CallbackServerContext* context, const lorad::v1::GenerateRequest* request) {
  // The caller first: tokenizing a prompt is work an unauthenticated caller must not get done.
  std::string client;
  if (auto s = Authorize(context, &client); !s.ok()) return Start(context, s);
  absl::StatusOr<engine::GenerationRequest> r = FromProto(request->sampling(), options_);
  if (!r.ok()) return Start(context, std::move(r));
  r->client = std::move(client);
  if (request->prompt().empty()) {
    r = absl::InvalidArgumentError("prompt: is empty");
  } else if (static_cast<int64_t>(request->prompt().size()) > options_.max_prompt_bytes) {
    r = absl::InvalidArgumentError(absl::StrCat("prompt: ", request->prompt().size(),
                                                " bytes; at most ", options_.max_prompt_bytes));
  } else if (auto s = CheckAdapterVersion(request->adapter(), request->adapter_version());
             !s.ok()) {
    r = s;
  } else {
    r->adapter = request->adapter();
    r->adapter_version = request->adapter_version();
    const bool special = !request->has_add_special_tokens() || request->add_special_tokens();
    r->prompt_ids = engine_.tokenizer().Encode(request->prompt(), special);
  }
  return Start(context, std::move(r));
}

grpc::ServerWriteReactor<GenerateChunk>* InferenceService::Chat(
    grpc::CallbackServerContext* context, const lorad::v1::ChatRequest* request) {
  std::string client;
  if (auto s = Authorize(context, &client); !s.ok()) return Start(context, s);
  absl::StatusOr<engine::GenerationRequest> r = FromProto(request->sampling(), options_);
  if (!r.ok()) return Start(context, std::move(r));
  r->client = std::move(client);
  // Roles count with the contents: half a million empty messages still render megabytes.
  int64_t bytes = 0;
  for (const auto& m : request->messages()) {
    bytes += static_cast<int64_t>(m.content().size() + m.role().size());
  }
  std::vector<engine::ChatMessage> messages;
  if (request->messages_size() <= kMaxChatMessages && bytes <= options_.max_prompt_bytes) {
    for (const auto& m : request->messages()) messages.push_back({m.role(), m.content()});
  }
  if (request->messages().empty()) {
    r = absl::InvalidArgumentError("messages: is empty");
  } else if (request->messages_size() > kMaxChatMessages) {
    r = absl::InvalidArgumentError(absl::StrCat("messages: ", request->messages_size(),
                                                " messages; at most ", kMaxChatMessages));
  } else if (bytes > options_.max_prompt_bytes) {
    r = absl::InvalidArgumentError(absl::StrCat(
        "messages: ", bytes, " bytes of roles and content; at most ", options_.max_prompt_bytes));
  } else if (auto s = CheckAdapterVersion(request->adapter(), request->adapter_version());
             !s.ok()) {
    r = s;
  } else {
    auto chat =
        engine_.RenderChat(messages, request->template_(), request->continue_final_message());
    if (!chat.ok()) {
      // A refusal of the template's own (roles that do not alternate) names the messages.
      r = absl::StartsWith(chat.status().message(), "chat template '")
              ? absl::Status(chat.status().code(),
                             absl::StrCat("messages: ", chat.status().message()))
              : chat.status();
    } else {
      r->prompt_field = "messages";
      r->adapter = request->adapter();
      r->adapter_version = request->adapter_version();
      r->prompt_ids = std::move(chat->prompt_ids);
      // The reply ends where the template ends a turn: as a token id when the tokenizer has one
      // (special tokens never reach the text), and as a stop string otherwise.
      if (!chat->end_of_turn.empty()) {
        // Not the caller's: the limits on stops do not count them.
        const auto add_stop = [&] {
          r->stop.push_back(chat->end_of_turn);
          ++r->added_stops;
        };
        if (auto id = engine_.tokenizer().IdOf(chat->end_of_turn)) {
          // With ignore_eos an end of turn that is an EOS id is passed too, as the EOS is.
          if (!(r->ignore_eos && engine_.tokenizer().IsEos(*id))) {
            r->stop_token_ids.push_back(*id);
            ++r->added_stop_token_ids;
            if (!engine_.tokenizer().IsSpecial(*id)) add_stop();
          }
        } else {
          add_stop();
        }
      }
    }
  }
  return Start(context, std::move(r));
}

}  // namespace lorad::server
