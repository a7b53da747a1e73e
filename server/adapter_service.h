// AdapterService: lists, loads and unloads the named, versioned LoRA adapters the engine serves
// (proto/lorad/v1/adapters.proto). LoadAdapter reads a PEFT folder that must resolve, after
// symlinks, inside the configured adapter root; loading an existing name publishes a new version
// (hot swap: running requests finish on the old one). UnloadAdapter waits for the requests that
// hold the adapter, on a thread of its own so no gRPC thread blocks.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "engine/runtime/engine.h"
#include "lorad/v1/adapters.grpc.pb.h"
#include "server/blocking_calls.h"
#include "server/job_store.h"
#include "server/open_calls.h"
#include "server/token_authenticator.h"

namespace lorad::server {

class AdapterService final : public lorad::v1::AdapterService::CallbackService {
 public:
  // `auth` (may be null: open): listing needs the user role, loading and unloading admin.
  // `record` (may be null) keeps what is loaded and unloaded, so a restart serves it again.
  // `blocking` (may be null: on gRPC's thread) reads LoadAdapter's files. `hold_job_folders`
  // (may be null) is held while a load is recorded, which then checks its folder is still
  // there: a DeleteJob (JobRunner::HoldJobFolders) may remove a job's folder an adapter root
  // that holds the jobs folder lets LoadAdapter read.
  // `on_name_gone` (may be null) is called once an unload has left a name no version, when the
  // last request on it ends, also after the UnloadAdapter call timed out
  // (InferenceService::ForgetAdapter; AdapterStore::SetNameGoneListener).
  // `max_loaded_names` (0: none): a LoadAdapter of a new name while that many names are loaded
  // is RESOURCE_EXHAUSTED (each keeps a host copy of its weights).
  AdapterService(engine::Engine& engine, std::string adapter_root,
                 const TokenAuthenticator* auth = nullptr, JobStore* record = nullptr,
                 BlockingCalls* blocking = nullptr,
                 std::function<std::unique_lock<std::mutex>()> hold_job_folders = nullptr,
                 std::function<void(const std::string&)> on_name_gone = nullptr,
                 int64_t max_loaded_names = 0);
  // Clears the store's name-gone listener it set: the engine (and the requests it ends as it goes)
  // outlives the services.
  ~AdapterService();

  grpc::ServerUnaryReactor* ListAdapters(grpc::CallbackServerContext* context,
                                         const lorad::v1::ListAdaptersRequest* request,
                                         lorad::v1::ListAdaptersResponse* response) override;
  grpc::ServerUnaryReactor* LoadAdapter(grpc::CallbackServerContext* context,
                                        const lorad::v1::LoadAdapterRequest* request,
                                        lorad::v1::Adapter* response) override;
  grpc::ServerUnaryReactor* UnloadAdapter(grpc::CallbackServerContext* context,
                                          const lorad::v1::UnloadAdapterRequest* request,
                                          lorad::v1::UnloadAdapterResponse* response) override;

 private:
  engine::Engine& engine_;
  std::string adapter_root_;
  const TokenAuthenticator* auth_;
  JobStore* record_;
  BlockingCalls* blocking_;
  std::function<std::unique_lock<std::mutex>()> hold_job_folders_;
  bool sets_name_gone_ = false;     // this service set the store's name-gone listener
  const int64_t max_loaded_names_;  // 0: no limit
  // Names LoadAdapter is reading now, each with its count of loads: counted against
  // max_loaded_names_ before they publish (two loads of new names at once both passed the check).
  std::mutex loading_mu_;
  std::map<std::string, int> loading_;
  // LoadAdapter's work: read, record and publish the folder; answer in `response`. CANCELLED,
  // nothing published, when `*abandon` is true by then (the client gone, lorad stopping).
  absl::Status Load(const lorad::v1::LoadAdapterRequest& request, const std::atomic<bool>* abandon,
                    lorad::v1::Adapter* response);
  // UnloadAdapter calls waiting for their adapter's requests, a thread each.
  OpenCalls unload_waiters_{16};
};

// The proto view of one adapter version.
void ToProto(const engine::AdapterInfo& info, lorad::v1::Adapter* out);

}  // namespace lorad::server
