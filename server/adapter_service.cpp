#include "server/adapter_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <system_error>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/lora/peft_config.h"
#include "engine/model/utf8.h"
#include "engine/runtime/durable_file.h"
#include "server/call_authorizer.h"
#include "server/grpc_status.h"
#include "server/job_spec_validator.h"
#include "server/path_policy.h"

namespace lorad::server {

void ToProto(const engine::AdapterInfo& info, lorad::v1::Adapter* out) {
  out->set_name(info.name);
  out->set_version(info.version);
  out->set_rank(info.rank);
  out->set_alpha(info.alpha);
  for (const auto& t : info.target_modules) out->add_target_modules(t);
  out->set_bytes(info.bytes);
  if (info.source.rfind("job:", 0) == 0) {
    out->set_source_job_id(info.source.substr(4));
  } else {
    out->set_source_path(info.source);
  }
  out->set_resident(info.resident);
  out->set_active_requests(info.requests);
  out->set_current(info.current);
  out->set_base_model(engine::Utf8Lossy(info.base_model));
  out->set_other_base(info.other_base);
}

AdapterService::AdapterService(engine::Engine& engine, std::string adapter_root,
                               const TokenAuthenticator* auth, JobStore* record,
                               BlockingCalls* blocking,
                               std::function<std::unique_lock<std::mutex>()> hold_job_folders,
                               std::function<void(const std::string&)> on_name_gone,
                               int64_t max_loaded_names)
    : engine_(engine),
      adapter_root_(std::move(adapter_root)),
      auth_(auth),
      record_(record),
      blocking_(blocking),
      hold_job_folders_(std::move(hold_job_folders)),
      sets_name_gone_(on_name_gone != nullptr),
      max_loaded_names_(max_loaded_names) {
  if (on_name_gone) engine_.adapters().SetNameGoneListener(std::move(on_name_gone));
}

AdapterService::~AdapterService() {
  if (sets_name_gone_) engine_.adapters().SetNameGoneListener(nullptr);
}

grpc::ServerUnaryReactor* AdapterService::ListAdapters(grpc::CallbackServerContext* context,
                                                       const lorad::v1::ListAdaptersRequest*,
                                                       lorad::v1::ListAdaptersResponse* response) {
  if (auth_ != nullptr) {
    if (auto s = AuthorizeCall(*auth_, *context, Role::kUser); !s.ok())
      return FinishUnary(context, s);
  }
  for (const auto& info : engine_.adapters().List()) ToProto(info, response->add_adapters());
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* AdapterService::LoadAdapter(grpc::CallbackServerContext* context,
                                                      const lorad::v1::LoadAdapterRequest* request,
                                                      lorad::v1::Adapter* response) {
  if (auth_ != nullptr) {
    if (auto s = AuthorizeCall(*auth_, *context, Role::kAdmin,
                               absl::StrCat("LoadAdapter '", request->name(), "'"));
        !s.ok())
      return FinishUnary(context, s);
  }
  if (auto s = CheckAdapterName(request->name(), "name"); !s.ok()) return FinishUnary(context, s);
  if (request->path().empty()) {
    return FinishUnary(context,
                       absl::InvalidArgumentError("path: is empty (a PEFT adapter folder)"));
  }
  if (blocking_ == nullptr) return FinishUnary(context, Load(*request, nullptr, response));
  // Reading, hashing and checking an adapter's weights takes seconds for a large one: not on
  // gRPC's threads. The request lives until the call ends.
  return blocking_->Run(context, [this, request, response](const std::atomic<bool>& give_up) {
    return Load(*request, &give_up, response);
  });
}

absl::Status AdapterService::Load(const lorad::v1::LoadAdapterRequest& request,
                                  const std::atomic<bool>* abandon, lorad::v1::Adapter* response) {
  {
    std::lock_guard<std::mutex> lock(loading_mu_);
    if (max_loaded_names_ > 0) {  // a new name, not a new version of a loaded one
      std::set<std::string> names, current;
      for (const auto& info : engine_.adapters().List()) {
        names.insert(info.name);
        if (info.current) current.insert(info.name);
      }
      for (const auto& [name, loads] : loading_) names.insert(name), current.insert(name);
      if (names.count(request.name()) == 0 &&
          static_cast<int64_t>(names.size()) >= max_loaded_names_) {
        // Unloaded names whose running requests still hold them count (their weights are still
        // in memory): said, or "unload one first" reads as a call that did nothing.
        std::vector<std::string> draining;
        for (const std::string& name : names) {
          if (current.count(name) == 0) draining.push_back("'" + name + "'");
        }
        return absl::ResourceExhaustedError(absl::StrCat(
            names.size(),
            " adapters are loaded or loading (limits.max_loaded_adapters; each keeps a host "
            "copy of its weights): unload one first, or raise the limit",
            draining.empty() ? ""
                             : absl::StrCat("; unloaded but still held by running requests, "
                                            "until they end: ",
                                            absl::StrJoin(draining, ", "))));
      }
    }
    ++loading_[request.name()];
  }
  // Until this load has published its version or failed.
  const auto loaded = absl::MakeCleanup([this, name = request.name()] {
    std::lock_guard<std::mutex> lock(loading_mu_);
    if (--loading_[name] == 0) loading_.erase(name);
  });
  auto folder = ResolveAdapterFolder(adapter_root_, request.path(), "path");
  if (!folder.ok()) return folder.status();
  // Its files are read as the files they resolve to now inside the root: a folder or file
  // swapped for a symlink to one outside since the check is refused, not read (and quoted).
  const engine::ScopedConfinedReads confined(adapter_root_);
  // The record as published: by the time List() runs, a load of the same name just after this
  // one may already have retired this version.
  engine::AdapterInfo published;
  // Served only once recorded (before it replaces the version that serves now), so that an
  // acknowledged load comes back after a restart, and only from the same files (their
  // fingerprint; none when they cannot be read again). A record that fails (a full disk) leaves
  // the current version serving.
  engine::AdapterStore::BeforePublish record;
  absl::Status recorded;
  // The client gave up while the files were read: it saw the call fail, so the version must not
  // serve (nor be recorded): a load it sends again would publish a second one.
  absl::Status gave_up;
  auto client_gone = [&]() {
    if (abandon == nullptr || !abandon->load()) return false;
    gave_up = absl::CancelledError(
        "the call ended (the client cancelled or its deadline passed) before the adapter "
        "was published; nothing changed");
    return true;
  };
  // What the files hold, taken before they are read and compared again before the version is
  // recorded: the record must name the files that serve (taken after the read, a folder rewritten
  // meanwhile was recorded with the new files' fingerprint while the old ones served, and a
  // restart served the new ones as that version).
  const std::string fingerprint =
      record_ != nullptr ? engine::PeftFolderFingerprint(*folder).value_or("") : std::string();
  if (record_ == nullptr) {
    record = [&](int64_t) { return client_gone() ? gave_up : absl::OkStatus(); };
  } else {
    record = [&](int64_t version) {
      std::unique_lock<std::mutex> held;
      if (hold_job_folders_) held = hold_job_folders_();
      if (client_gone()) return gave_up;
      // Read, but deleted since (its job, by DeleteJob): a restart could not serve it again.
      std::error_code ec;
      if (!std::filesystem::is_directory(*folder, ec)) {
        recorded = absl::NotFoundError(
            absl::StrCat("adapter folder ", *folder, " was deleted while it was loaded"));
        return recorded;
      }
      if (engine::PeftFolderFingerprint(*folder).value_or("") != fingerprint) {
        recorded = absl::AbortedError(
            absl::StrCat("adapter folder ", *folder, " changed while it was read; load it again"));
        return recorded;
      }
      recorded = record_->RecordAdapter(
          {request.name(), version, *folder, *folder, /*served=*/true, fingerprint});
      return recorded;
    };
  }
  auto version = engine_.adapters().LoadPeft(request.name(), *folder, "", &published, record);
  if (!version.ok()) {
    if (!gave_up.ok()) return gave_up;
    if (!recorded.ok()) {
      return absl::Status(recorded.code(), absl::StrCat("recording adapter '", request.name(),
                                                        "' failed: ", recorded.message()));
    }
    return version.status();
  }
  ToProto(published, response);
  // An operator's hot swap, in the log beside the jobs' publications.
  spdlog::info("adapter {} version {} loaded from {} (LoadAdapter){}", request.name(),
               published.version, *folder,
               published.base_model.empty()
                   ? std::string()
                   : absl::StrCat("; its adapter_config.json names the base model '",
                                  published.base_model, "'"));
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* AdapterService::UnloadAdapter(
    grpc::CallbackServerContext* context, const lorad::v1::UnloadAdapterRequest* request,
    lorad::v1::UnloadAdapterResponse* response) {
  if (auth_ != nullptr) {
    if (auto s = AuthorizeCall(*auth_, *context, Role::kAdmin,
                               absl::StrCat("UnloadAdapter '", request->name(), "'"));
        !s.ok())
      return FinishUnary(context, s);
  }
  // A name served now, or recorded as served, may be one an older lorad took (up to 128
  // characters, any first one) that each start serves again, or could not (its folder changed)
  // while its record blocks deleting its job: it must stay unloadable, whatever today's rule for
  // new names says.
  if (auto s = CheckAdapterName(request->name(), "name"); !s.ok()) {
    const auto served = engine_.adapters().List();
    bool known = std::any_of(served.begin(), served.end(),
                             [&](const auto& info) { return info.name == request->name(); });
    if (!known && record_ != nullptr && !request->name().empty()) {  // "": every name's
      auto recorded = record_->ServedAdapters(request->name());
      known = recorded.ok() && !recorded->empty();
    }
    if (!known) return FinishUnary(context, s);
  }
  std::optional<int64_t> version;
  if (request->version() < 0) {
    return FinishUnary(context,
                       absl::InvalidArgumentError("version: must be >= 0 (0 = every version)"));
  }
  if (request->version() > 0) version = request->version();
  // Each call waits on a thread of its own: a flood of them (thousands of threads) must not
  // exhaust the process's threads. Refused before anything changes.
  std::optional<OpenCalls::Slot> waiter = unload_waiters_.TryTake();
  if (!waiter) {
    return FinishUnary(context, absl::ResourceExhaustedError(absl::StrCat(
                                    unload_waiters_.limit(),
                                    " UnloadAdapter calls are waiting for their adapters' "
                                    "requests to end; retry once they have")));
  }
  std::optional<int64_t> current_unloaded;  // the version that served, when it goes
  // What this call unloads, at most (0: nothing, NotFound): a version published after this
  // look (a LoadAdapter, a job's end) is recorded as served and stays so.
  int64_t newest_listed = 0;
  for (const auto& info : engine_.adapters().List()) {
    if (info.name == request->name() && (!version || info.version == *version)) {
      ToProto(info, response->add_unloaded());
      if (info.current) current_unloaded = info.version;
      newest_listed = std::max(newest_listed, info.version);
    }
  }
  // Nothing of the name serves, but the record says it does: the restart could not serve it again
  // (its folder changed or left the adapter root, another base model). Unloading clears the
  // record, so that a later restart does not try again and its job can be deleted.
  if (newest_listed == 0 && record_ != nullptr) {
    auto recorded = record_->ServedAdapters(request->name());
    if (!recorded.ok()) return FinishUnary(context, recorded.status());
    for (const ServedAdapter& a : *recorded) {
      if (a.name != request->name() || !a.served || (version && a.version != *version)) continue;
      // A version newer than the restart restored is this process's own, being published right
      // now (recorded before it serves): not a record left behind, and not this call's to clear.
      if (a.version > engine_.adapters().RestoredVersion(a.name)) continue;
      if (auto s = record_->MarkAdapterUnserved(a.name, a.version); !s.ok()) {
        return FinishUnary(context,
                           absl::Status(s.code(), absl::StrCat("recording the unload of '", a.name,
                                                               "' failed: ", s.message())));
      }
      engine_.adapters().ForgetNotServedAgain(a.name);  // now plainly not loaded
      engine::AdapterInfo info;
      info.name = a.name;
      info.version = a.version;
      info.source = a.source;
      ToProto(info, response->add_unloaded());
      spdlog::info("adapter {} version {} unloaded (UnloadAdapter; it was recorded as served)",
                   a.name, a.version);
      return FinishUnary(context, absl::OkStatus());
    }
  }
  // The name serves nothing after this: a restart must not bring it back. Recorded first: an
  // unload that a restart would undo is refused (a full disk).
  if (current_unloaded && record_ != nullptr) {
    if (auto s = record_->MarkAdapterUnserved(request->name(), *current_unloaded); !s.ok()) {
      return FinishUnary(
          context, absl::Status(s.code(), absl::StrCat("recording the unload of '", request->name(),
                                                       "' failed: ", s.message())));
    }
  }
  // Unload waits for the adapter's requests to finish: on a thread of our own, until a little
  // before the call's deadline (a fifth of it, at most 250 ms: the answer must reach the client
  // in time), and answers from there. Requests still running then do not fail the call: the
  // unload has taken effect (new requests get NOT_FOUND, a restart does not serve it again), and
  // the reply lists the versions still draining with their running requests.
  auto* reactor = context->DefaultReactor();
  const auto deadline = CallDeadline(*context);
  auto timeout = std::chrono::milliseconds(std::chrono::hours(1));
  if (deadline != std::chrono::steady_clock::time_point::max()) {
    timeout = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    timeout -= std::min(timeout / 5, std::chrono::milliseconds(250));
    if (timeout.count() < 0) timeout = std::chrono::milliseconds(0);
  }
  // A client that has gone (cancelled, disconnected: grpcurl and a plain stub set no deadline)
  // ends the wait: each one held one of the unload_waiters_ places for the hour.
  const auto unload = [this, context, response, name = request->name(), version,
                       newest_listed](std::chrono::milliseconds wait) {
    const absl::Status status = engine_.adapters().Unload(
        name, version, wait, newest_listed, [context] { return context->IsCancelled(); });
    const bool draining = status.code() == absl::StatusCode::kDeadlineExceeded ||
                          status.code() == absl::StatusCode::kCancelled;
    if (!status.ok() && !draining) return status;
    // The reply as things are now (it was listed before the wait): unloaded, and the requests
    // still running on each version (none once it is freed).
    std::map<int64_t, engine::AdapterInfo> now;
    for (auto& info : engine_.adapters().List()) {
      if (info.name == name) now.emplace(info.version, std::move(info));
    }
    for (auto& listed : *response->mutable_unloaded()) {
      const auto it = now.find(listed.version());
      listed.set_active_requests(it == now.end() ? 0 : it->second.requests);
      listed.set_resident(it != now.end() && it->second.resident);
      listed.set_current(false);
    }
    spdlog::info("adapter {} unloaded (UnloadAdapter){}", name,
                 draining ? "; it leaves memory when the requests still running on it end" : "");
    return absl::OkStatus();
  };
  try {
    // `this` outlives the thread: the server's shutdown waits for every call to Finish.
    std::thread([reactor, unload, timeout, waiter = std::move(*waiter)] {
      reactor->Finish(ToGrpcStatus(unload(timeout)));
    }).detach();
  } catch (const std::system_error&) {  // no thread to wait on: retire it, without waiting
    reactor->Finish(ToGrpcStatus(unload(std::chrono::milliseconds(0))));
  }
  return reactor;
}

}  // namespace lorad::server
