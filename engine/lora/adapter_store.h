// AdapterStore: the named, versioned LoRA adapters the engine serves, with their lifecycle
// (TensorRT-LLM's PEFT cache: acquire, ensure resident, release):
//
//   Publish / LoadPeft  a new version becomes the one new requests get (atomic hot swap); the
//                       previous version is retired: requests that hold it finish on it, and it
//                       is freed when the last one releases it.
//   Acquire             pins the current version of a name for one request (AdapterLease); the
//                       lease keeps that version alive whatever is published or unloaded after.
//   Activate            (GPU loop) makes the leased version resident on the device, evicting the
//                       least recently used resident adapter that no running request uses; at
//                       most max_resident adapters are resident.
//   Unload              retires a name (or one version), waits until no request holds it, frees.
//
// Every adapter keeps a host copy (CPU, in the compute dtype) from which it is made resident
// again after an eviction. torch-free header, so the server can list, load and unload.
//
// Thread rules: every method is thread-safe. Activate/Deactivate do device copies and belong on
// the GPU loop thread; Unload blocks and must never be called from the GPU loop thread (it waits
// for requests that only that thread can finish).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model/model_config.h"

namespace lorad::engine {

struct LoraAdapter;

struct AdapterStoreOptions {
  int32_t max_resident = 8;       // adapters on the device at once
  std::string device = "cpu";     // where resident copies live: "cpu", "cuda", "cuda:1"
  std::string dtype = "float32";  // their dtype: float32, bfloat16, float16 (the compute dtype)
};

struct AdapterInfo {
  std::string name;
  int64_t version = 0;
  int32_t rank = 0;
  double alpha = 0;
  std::vector<std::string> target_modules;
  int64_t bytes = 0;      // of the host copy
  std::string source;     // a folder, or "job:<id>"
  bool current = false;   // new requests get this version
  bool resident = false;  // on the device now
  int32_t requests = 0;   // requests holding it
  // The base model its adapter_config.json names (base_model_name_or_path); empty if none.
  std::string base_model;
  // Published on another base model than the one served (its files differ): MarkOtherBase.
  bool other_base = false;
};

class AdapterStore;

// One request's hold on one adapter version. Movable; releasing (destruction) lets a retired
// version be freed. Obtained from AdapterStore::Acquire; must not outlive the store.
class AdapterLease {
 public:
  AdapterLease() = default;
  AdapterLease(AdapterLease&& other) noexcept;
  AdapterLease& operator=(AdapterLease&& other) noexcept;
  AdapterLease(const AdapterLease&) = delete;
  AdapterLease& operator=(const AdapterLease&) = delete;
  ~AdapterLease();

  bool valid() const { return entry_ != nullptr; }
  const std::string& name() const;
  int64_t version() const;
  // Whether Unload named this version since (a request holding it that has not started ends).
  bool unloaded() const;
  // The host copy (CPU, in the compute dtype: AdapterStoreOptions::dtype).
  const LoraAdapter& host() const;

  // GPU loop: makes this version resident and keeps it so until Deactivate (or release); returns
  // the device copy. UNAVAILABLE when max_resident adapters are resident and all are in use (the
  // request waits); RESOURCE_EXHAUSTED when the copy failed (device memory). Idempotent.
  absl::StatusOr<const LoraAdapter*> Activate();
  void Deactivate();
  void Release();

  struct Entry;  // one version's record; defined in adapter_store.cpp

 private:
  friend class AdapterStore;
  AdapterLease(AdapterStore* store, std::shared_ptr<Entry> entry)
      : store_(store), entry_(std::move(entry)) {}
  AdapterStore* store_ = nullptr;
  std::shared_ptr<Entry> entry_;
  bool active_ = false;
};

class AdapterStore {
 public:
  // `base` checks every adapter's shapes before it is published.
  static absl::StatusOr<std::unique_ptr<AdapterStore>> Create(const ModelConfig& base,
                                                              const AdapterStoreOptions& options);
  ~AdapterStore();

  // Called with a new version's number once it is checked and copied, before it serves (without
  // the store's lock): the server records it there, so that a version it could not record never
  // serves. An error publishes nothing (the number is used again unless a later one was
  // taken meanwhile) and is Publish's result.
  using BeforePublish = std::function<absl::Status(int64_t version)>;

  // Publishes `adapter` as the next version of `name` (1 for a new name); returns the version,
  // and its record as published in `published` (a List() after the call may already miss it:
  // a newer version retires an unused one at once, and one published while `before_publish` ran
  // retires this one). InvalidArgument for a bad name or shapes that do not fit the base model.
  absl::StatusOr<int64_t> Publish(const std::string& name, const LoraAdapter& adapter,
                                  const std::string& source, AdapterInfo* published = nullptr,
                                  const BeforePublish& before_publish = nullptr);
  // Reads a PEFT folder (LoraAdapter::ReadPeft) and publishes it.
  // `source` ("job:<id>" for a training job's adapter) defaults to the folder.
  absl::StatusOr<int64_t> LoadPeft(const std::string& name, const std::string& folder,
                                   const std::string& source = "", AdapterInfo* published = nullptr,
                                   const BeforePublish& before_publish = nullptr);

  // The next version published under `name` will be at least `version` + 1 (a restart restores
  // the versions a name had, so that they only grow).
  void ContinueVersionsAfter(const std::string& name, int64_t version);
  // Unload calls waiting for running requests return now, and later ones do not wait (a
  // shutdown: the unload took effect; what drains is freed when its requests end).
  void EndUnloadWaits();
  // Why a restart left `name` out (its folder changed, it does not fit the base): Acquire's
  // NotFound says so, until a version of it is published.
  void NoteNotServedAgain(const std::string& name, const std::string& why);
  // Says (AdapterInfo::other_base) that this version was published on another base model than
  // the one served now (a restart on a changed model folder).
  void MarkOtherBase(const std::string& name, int64_t version);
  // An unload cleared that record: NotFound says only that it is not loaded.
  void ForgetNotServedAgain(const std::string& name);
  // The highest version ContinueVersionsAfter was given for `name` (0: none): a version above it
  // was handed out by this process.
  int64_t RestoredVersion(const std::string& name) const;
  // The current version of `name` for one request. NotFound naming the adapter.
  absl::StatusOr<AdapterLease> Acquire(const std::string& name);
  bool Contains(const std::string& name) const;
  // Adapters resident on the device at most (AdapterStoreOptions::max_resident).
  int32_t max_resident() const;
  // The (name, version) of every current version resident on the device: List()'s answer to that
  // question alone, cheap enough for the engine to ask on every step a request ends.
  std::vector<std::pair<std::string, int64_t>> CurrentResident() const;

  // Retires `name` (every version, or only `version`): new requests get NotFound at once; then
  // waits until no request holds it and frees it. DeadlineExceeded after `timeout` (it is still
  // freed when its last request ends). NotFound for an unknown name or version. `up_to`: only
  // versions up to it (what the caller saw and recorded as unloaded; one published since stays,
  // and those seen but already replaced and freed make it OK); 0 unloads nothing (NotFound).
  // `give_up` (optional), asked every 100 ms of the wait (under the store's lock: keep it cheap,
  // e.g. whether the caller's client has gone): true ends the wait with CANCELLED (the unload
  // holds; it is freed when its last request ends).
  absl::Status Unload(const std::string& name, std::optional<int64_t> version = std::nullopt,
                      std::chrono::milliseconds timeout = std::chrono::hours(24),
                      std::optional<int64_t> up_to = std::nullopt,
                      const std::function<bool()>& give_up = nullptr);

  // Called (on the calling thread, without the store's lock) whenever a version stops being
  // current: a newer one was published, or it was unloaded. The engine uses it to wake its loop,
  // which then releases its own copies of that version while idle. Set once, before use.
  void SetRetireListener(std::function<void()> listener);
  // Called (on the calling thread, without the store's lock) when a name is left without any
  // version, current or held: an unload's last request ended (the unload may have timed out long
  // before), or an unused one was unloaded. The server forgets the name's metric series then,
  // after that last request was counted. Set once, before use; set to nullptr before what it
  // calls goes (the engine, and the requests it ends as it stops, outlive the services).
  void SetNameGoneListener(std::function<void(const std::string&)> listener);

  // Current versions and retired ones still held by requests, by name then version.
  std::vector<AdapterInfo> List() const;
  int32_t resident_count() const;
  int64_t resident_bytes() const;  // device copies
  int64_t host_bytes() const;      // host copies of every version still alive

  struct State;  // shared with AdapterLease; defined in adapter_store.cpp

 private:
  friend class AdapterLease;
  explicit AdapterStore(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace lorad::engine
