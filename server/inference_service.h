// InferenceService: Generate and Chat over gRPC (proto/lorad/v1/inference.proto). Each call becomes
// one engine request; its token events are coalesced into GenerateChunks and streamed, one write
// in flight at a time, so a slow client never holds up the GPU loop (events queue in the stream
// and merge into the next chunk). A client cancel or deadline cancels the engine request, which
// frees its KV blocks at the loop's next step.
//
// Thread rules: handlers run on gRPC threads; token events arrive on the engine's loop thread and
// only queue; both sides meet under the stream's lock.
#pragma once

#include <atomic>
#include <memory>

#include "engine/infer/generation_defaults.h"
#include "engine/runtime/engine.h"
#include "lorad/v1/inference.grpc.pb.h"
#include "server/metrics_registry.h"
#include "server/open_calls.h"
#include "server/token_authenticator.h"

namespace lorad::server {

// A chat's messages at most (each is rendered and tokenized before the request is queued).
inline constexpr int kMaxChatMessages = 4096;

struct InferenceOptions {
  int32_t max_new_tokens = 4096;         // larger requests are INVALID_ARGUMENT
  int32_t default_max_new_tokens = 256;  // unless `defaults` has the model's own
  int64_t max_prompt_bytes = 1 << 20;
  // Generate and Chat streams open at once, until their last chunk is written: a stream whose
  // client stopped reading holds its output after the engine is done with it, so the engine's
  // own queue limit does not bound them. More are RESOURCE_EXHAUSTED.
  int64_t max_open_streams = 1024;
  // Of those, one client's at most (GenerationRequest::client: its token's name, or without
  // tokens its connection); 0: no limit. More are RESOURCE_EXHAUSTED, so that one client's burst
  // cannot fill every place.
  int64_t max_streams_per_client = 0;
  // A stream's output not yet written to its client, in bytes (about): past it the stream ends
  // RESOURCE_EXHAUSTED and its request is cancelled.
  int64_t max_unread_stream_bytes = int64_t{8} << 20;
  // What a request gets for the sampling fields it leaves unset (the model's
  // generation_config.json under model.generation_config: auto; else greedy).
  engine::GenerationDefaults defaults;
};

class InferenceService final : public lorad::v1::InferenceService::CallbackService {
 public:
  // `auth` (may be null: open) must outlive the service; every call needs the user role.
  InferenceService(engine::Engine& engine, MetricsRegistry& metrics, InferenceOptions options,
                   const TokenAuthenticator* auth = nullptr);

  grpc::ServerWriteReactor<lorad::v1::GenerateChunk>* Generate(
      grpc::CallbackServerContext* context, const lorad::v1::GenerateRequest* request) override;
  grpc::ServerWriteReactor<lorad::v1::GenerateChunk>* Chat(
      grpc::CallbackServerContext* context, const lorad::v1::ChatRequest* request) override;

  // Drops the request series of an adapter that no longer serves (after its last version was
  // unloaded): adapters loaded and unloaded by the thousand must not grow /metrics for ever.
  void ForgetAdapter(const std::string& name);

  // Request metrics, shared by every stream.
  struct Metrics {
    HistogramFamily& time_to_first_token;
    HistogramFamily& inter_token_latency;
    HistogramFamily& e2e_latency;
    HistogramFamily& queue_time;
    CounterFamily& prompt_tokens;
    CounterFamily& generation_tokens;
    CounterFamily& requests;  // by adapter and finish reason
  };

 private:
  grpc::ServerWriteReactor<lorad::v1::GenerateChunk>* Start(
      grpc::CallbackServerContext* context, absl::StatusOr<engine::GenerationRequest> request);

  // UNAUTHENTICATED / PERMISSION_DENIED unless the caller holds the user role (open: OK).
  // The caller checked, and named in *client (GenerationRequest::client): its token's name, or
  // without tokens its connection (peer address and port).
  absl::Status Authorize(const grpc::CallbackServerContext* context, std::string* client) const;

  engine::Engine& engine_;
  InferenceOptions options_;
  const TokenAuthenticator* auth_;
  Metrics metrics_;
  OpenCalls open_streams_;  // a stream holds its slot until it is done (OnDone)
  std::unique_ptr<OpenCallsPerKey> client_streams_;  // null: no per-client limit
  // Open streams whose request has finished: their clients have not read all of them yet.
  std::shared_ptr<std::atomic<int64_t>> finished_unread_ =
      std::make_shared<std::atomic<int64_t>>(0);
};

}  // namespace lorad::server
