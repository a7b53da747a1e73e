#include "engine/lora/adapter_store.h"

#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/lora/lora_adapter.h"
#include "engine/lora/lora_applier.h"

namespace lorad::engine {

// One version of one adapter. Guarded by State::mu.
struct AdapterLease::Entry {
  std::string name;
  int64_t version = 0;
  std::string source;
  std::shared_ptr<const LoraAdapter> host;    // CPU, the compute dtype; reset when freed
  std::shared_ptr<const LoraAdapter> device;  // resident copy, or null
  int32_t users = 0;                          // leases held
  int32_t active = 0;                         // leases activated (running requests)
  uint64_t last_used = 0;                     // LRU tick of the last Activate
  bool current = false;
  bool alive = true;  // false once retired and released by its last user (freed)
  // Unload named it: requests holding it that have not started end (read without the lock).
  std::atomic<bool> unloaded{false};
  bool other_base = false;  // MarkOtherBase
};

struct AdapterStore::State {
  std::mutex mu;
  std::condition_variable released;  // signalled when a retired version is freed
  bool unload_waits_ended = false;   // EndUnloadWaits: Unload waits no more
  ModelConfig base;
  AdapterStoreOptions options;
  torch::Device device = torch::kCPU;
  torch::ScalarType dtype = torch::kFloat;
  std::map<std::string, int64_t> last_version;  // every name ever published
  // The newest version of each name that became current (it may be unloaded since): an older
  // one whose recording finished later never serves.
  std::map<std::string, int64_t> newest_published;
  // The versions a restart restored (ContinueVersionsAfter): a later one is this process's own.
  std::map<std::string, int64_t> restored_version;
  // Why a restart did not serve a name again (NoteNotServedAgain), until a version is published.
  std::map<std::string, std::string> not_served_again;
  std::map<std::string, std::shared_ptr<AdapterLease::Entry>> current;
  std::vector<std::shared_ptr<AdapterLease::Entry>> entries;  // every live version
  uint64_t tick = 0;
  std::function<void()> on_retire;                       // SetRetireListener's
  std::function<void(const std::string&)> on_name_gone;  // SetNameGoneListener's
  std::vector<std::string> gone;  // names MaybeFree left without a version, not yet told

  bool same_as_host() const { return device.is_cpu(); }

  // Tells the retire listener, if any, that a version stopped being current: called with `lock`
  // (on mu) held, it copies the listener, releases the lock for the call (the listener may take
  // the engine's lock or call back into the store) and takes it again.
  void NotifyRetired(std::unique_lock<std::mutex>& lock) {
    if (!on_retire) return;
    const std::function<void()> notify = on_retire;
    lock.unlock();
    notify();
    lock.lock();
  }

  // Frees `e` when it is retired and unused. Caller holds mu, and calls NotifyGone after.
  void MaybeFree(const std::shared_ptr<AdapterLease::Entry>& e) {
    if (e->current || e->users > 0 || !e->alive) return;
    e->alive = false;
    e->host.reset();
    e->device.reset();
    entries.erase(std::remove(entries.begin(), entries.end(), e), entries.end());
    if (current.count(e->name) == 0 &&
        std::none_of(entries.begin(), entries.end(),
                     [&](const auto& other) { return other->name == e->name; })) {
      gone.push_back(e->name);
    }
    released.notify_all();
  }
  // Tells the name-gone listener of the names MaybeFree left without a version, as
  // NotifyRetired tells its listener (the lock released for the call).
  void NotifyGone(std::unique_lock<std::mutex>& lock) {
    if (gone.empty()) return;
    std::vector<std::string> names;
    names.swap(gone);
    if (!on_name_gone) return;
    const std::function<void(const std::string&)> notify = on_name_gone;
    lock.unlock();
    for (const std::string& name : names) notify(name);
    lock.lock();
  }
  int32_t Resident() const {
    int32_t n = 0;
    for (const auto& e : entries) n += e->device != nullptr;
    return n;
  }
};

namespace {

int64_t HostBytes(const LoraAdapter& a) { return a.bytes(); }

absl::Status CheckName(const std::string& name) {
  if (name.empty() || name.size() > 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter name must be 1 to 128 characters, got ", name.size()));
  }
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter name '", name, "' may hold only letters, digits, '-', '_' and '.'"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<torch::ScalarType> ParseDtype(const std::string& name) {
  if (name == "float32") return torch::kFloat;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kHalf;
  return absl::InvalidArgumentError(absl::StrCat(
      "adapter store dtype '", name, "' is unknown (known: float32, bfloat16, float16)"));
}

}  // namespace

// --- AdapterLease ---

AdapterLease::AdapterLease(AdapterLease&& other) noexcept
    : store_(other.store_), entry_(std::move(other.entry_)), active_(other.active_) {
  other.store_ = nullptr;
  other.active_ = false;
}

AdapterLease& AdapterLease::operator=(AdapterLease&& other) noexcept {
  if (this != &other) {
    Release();
    store_ = other.store_;
    entry_ = std::move(other.entry_);
    active_ = other.active_;
    other.store_ = nullptr;
    other.active_ = false;
  }
  return *this;
}

AdapterLease::~AdapterLease() { Release(); }

const std::string& AdapterLease::name() const { return entry_->name; }
int64_t AdapterLease::version() const { return entry_->version; }
bool AdapterLease::unloaded() const { return entry_ != nullptr && entry_->unloaded.load(); }
const LoraAdapter& AdapterLease::host() const { return *entry_->host; }

absl::StatusOr<const LoraAdapter*> AdapterLease::Activate() {
  AdapterStore::State& s = *store_->state_;
  std::lock_guard<std::mutex> lock(s.mu);
  Entry& e = *entry_;
  if (!active_) {
    if (e.device == nullptr) {
      // Evict least recently used resident adapters nobody runs on until one slot is free.
      while (s.Resident() >= s.options.max_resident) {
        std::shared_ptr<Entry> victim;
        for (const auto& other : s.entries) {
          if (other->device != nullptr && other->active == 0 &&
              (victim == nullptr || other->last_used < victim->last_used)) {
            victim = other;
          }
        }
        if (victim == nullptr) {
          return absl::UnavailableError(absl::StrCat(
              "all ", s.options.max_resident, " resident adapter slots are in use; adapter '",
              e.name, "' waits for one"));
        }
        victim->device.reset();
      }
      if (s.same_as_host()) {
        e.device = e.host;
      } else {
        try {
          auto copy = std::make_shared<LoraAdapter>();
          copy->config = e.host->config;
          for (const auto& [path, pair] : e.host->layers) {
            copy->layers[path] =
                LoraPair{pair.a.to(s.device, s.dtype), pair.b.to(s.device, s.dtype)};
          }
          e.device = std::move(copy);
        } catch (const c10::Error& err) {
          return absl::ResourceExhaustedError(absl::StrCat("copying adapter '", e.name, "' v",
                                                           e.version, " to ", s.device.str(), ": ",
                                                           err.what_without_backtrace()));
        }
      }
    }
    ++e.active;
    active_ = true;
  }
  e.last_used = ++s.tick;
  return e.device.get();
}

void AdapterLease::Deactivate() {
  if (!active_) return;
  std::lock_guard<std::mutex> lock(store_->state_->mu);
  --entry_->active;
  active_ = false;
}

void AdapterLease::Release() {
  if (entry_ == nullptr) return;
  Deactivate();
  {
    std::unique_lock<std::mutex> lock(store_->state_->mu);
    --entry_->users;
    store_->state_->MaybeFree(entry_);
    store_->state_->NotifyGone(lock);
  }
  entry_.reset();
  store_ = nullptr;
}

// --- AdapterStore ---

AdapterStore::AdapterStore(std::unique_ptr<State> state) : state_(std::move(state)) {}
AdapterStore::~AdapterStore() = default;

absl::StatusOr<std::unique_ptr<AdapterStore>> AdapterStore::Create(
    const ModelConfig& base, const AdapterStoreOptions& options) {
  if (options.max_resident < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter store max_resident must be >= 1, got ", options.max_resident));
  }
  auto state = std::make_unique<State>();
  state->base = base;
  state->options = options;
  auto dtype = ParseDtype(options.dtype);
  if (!dtype.ok()) return dtype.status();
  state->dtype = *dtype;
  try {
    state->device = torch::Device(options.device);
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter store device '", options.device,
                     "' is not a device: ", e.what_without_backtrace()));
  }
  return std::unique_ptr<AdapterStore>(new AdapterStore(std::move(state)));
}

namespace {

// One version's record as List reports it; under the store's lock.
AdapterInfo InfoOf(const AdapterLease::Entry& e) {
  AdapterInfo info;
  info.name = e.name;
  info.version = e.version;
  info.rank = e.host->config.r;
  info.alpha = e.host->config.alpha;
  info.base_model = e.host->config.base_model_name_or_path;
  // The projections the adapter has weights for (a config may name more than its file holds).
  std::set<std::string> targets;
  for (const auto& [path, pair] : e.host->layers) targets.insert(path.substr(path.rfind('.') + 1));
  for (int p = 0; p < kNumProjections; ++p) {  // in the model's order
    const char* projection = ProjectionName(static_cast<Projection>(p));
    if (targets.count(projection) > 0) info.target_modules.push_back(projection);
  }
  info.bytes = HostBytes(*e.host);
  info.source = e.source;
  info.current = e.current;
  info.resident = e.device != nullptr;
  info.requests = e.users;
  info.other_base = e.other_base;
  return info;
}

}  // namespace

absl::StatusOr<int64_t> AdapterStore::Publish(const std::string& name, const LoraAdapter& adapter,
                                              const std::string& source, AdapterInfo* published,
                                              const BeforePublish& before_publish) {
  if (auto st = CheckName(name); !st.ok()) return st;
  State& s = *state_;
  if (auto st = adapter.ValidateAgainst(s.base); !st.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter '", name, "' does not fit the base model: ", st.message()));
  }
  auto entry = std::make_shared<AdapterLease::Entry>();
  try {
    // The host copy is the store's own (CPU, detached): the publisher may keep training. In the
    // compute dtype (bf16 on a GPU), rounded once here as the device copy was rounded from an
    // fp32 one: the same weights serve, for half the host memory (an 8B-shaped r=16 adapter on
    // every projection: 84 MB, not 168) and half the bytes to copy when it is made resident.
    torch::NoGradGuard no_grad;
    auto host = std::make_shared<LoraAdapter>();
    host->config = adapter.config;
    for (const auto& [path, pair] : adapter.layers) {
      host->layers[path] = LoraPair{pair.a.detach().to(torch::kCPU, s.dtype, false, /*copy=*/true),
                                    pair.b.detach().to(torch::kCPU, s.dtype, false, /*copy=*/true)};
    }
    entry->host = std::move(host);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("copying adapter '", name, "': ", e.what_without_backtrace()));
  }
  entry->name = name;
  entry->source = source;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    entry->version = ++s.last_version[name];
  }
  if (before_publish) {
    if (auto st = before_publish(entry->version); !st.ok()) {
      // The number goes back unless a later one was taken meanwhile: versions only grow.
      std::lock_guard<std::mutex> lock(s.mu);
      if (s.last_version[name] == entry->version) --s.last_version[name];
      return st;
    }
  }
  std::unique_lock<std::mutex> lock(s.mu);
  auto it = s.current.find(name);
  int64_t& newest = s.newest_published[name];
  if (newest > entry->version) {
    // A newer version was published while this one was recorded (and may since have been
    // unloaded: this one must not serve in its place): it never serves.
    if (published != nullptr) *published = InfoOf(*entry);
    return entry->version;
  }
  newest = entry->version;
  entry->current = true;
  const bool replaced = it != s.current.end();
  if (replaced) {
    std::shared_ptr<AdapterLease::Entry> old = it->second;
    old->current = false;
    it->second = entry;
    s.MaybeFree(old);
  } else {
    s.current.emplace(name, entry);
  }
  s.not_served_again.erase(name);
  s.entries.push_back(entry);
  const int64_t version = entry->version;
  if (published != nullptr) *published = InfoOf(*entry);
  if (replaced) s.NotifyRetired(lock);
  return version;
}

void AdapterStore::SetRetireListener(std::function<void()> listener) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->on_retire = std::move(listener);
}

void AdapterStore::SetNameGoneListener(std::function<void(const std::string&)> listener) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->on_name_gone = std::move(listener);
}

absl::StatusOr<int64_t> AdapterStore::LoadPeft(const std::string& name, const std::string& folder,
                                               const std::string& source, AdapterInfo* published,
                                               const BeforePublish& before_publish) {
  auto adapter = LoraAdapter::ReadPeft(folder);
  if (!adapter.ok()) return adapter.status();
  return Publish(name, *adapter, source.empty() ? folder : source, published, before_publish);
}

void AdapterStore::ContinueVersionsAfter(const std::string& name, int64_t version) {
  std::lock_guard<std::mutex> lock(state_->mu);
  int64_t& last = state_->last_version[name];
  last = std::max(last, version);
  int64_t& restored = state_->restored_version[name];
  restored = std::max(restored, version);
}

void AdapterStore::EndUnloadWaits() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->unload_waits_ended = true;
  }
  state_->released.notify_all();
}

void AdapterStore::NoteNotServedAgain(const std::string& name, const std::string& why) {
  std::lock_guard<std::mutex> lock(state_->mu);
  if (state_->current.count(name) == 0) state_->not_served_again[name] = why;
}

void AdapterStore::MarkOtherBase(const std::string& name, int64_t version) {
  std::lock_guard<std::mutex> lock(state_->mu);
  for (const auto& e : state_->entries) {
    if (e->name == name && e->version == version) e->other_base = true;
  }
}

void AdapterStore::ForgetNotServedAgain(const std::string& name) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->not_served_again.erase(name);
}

int64_t AdapterStore::RestoredVersion(const std::string& name) const {
  std::lock_guard<std::mutex> lock(state_->mu);
  const auto it = state_->restored_version.find(name);
  return it == state_->restored_version.end() ? 0 : it->second;
}

absl::StatusOr<AdapterLease> AdapterStore::Acquire(const std::string& name) {
  std::lock_guard<std::mutex> lock(state_->mu);
  auto it = state_->current.find(name);
  if (it == state_->current.end()) {
    const auto why = state_->not_served_again.find(name);
    return absl::NotFoundError(
        absl::StrCat("adapter '", name, "' is not loaded",
                     why == state_->not_served_again.end() ? "" : absl::StrCat(": ", why->second)));
  }
  ++it->second->users;
  return AdapterLease(this, it->second);
}

bool AdapterStore::Contains(const std::string& name) const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->current.count(name) > 0;
}

int32_t AdapterStore::max_resident() const { return state_->options.max_resident; }

std::vector<std::pair<std::string, int64_t>> AdapterStore::CurrentResident() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  std::vector<std::pair<std::string, int64_t>> out;
  for (const auto& e : state_->entries) {
    if (e->current && e->device != nullptr) out.emplace_back(e->name, e->version);
  }
  return out;
}

absl::Status AdapterStore::Unload(const std::string& name, std::optional<int64_t> version,
                                  std::chrono::milliseconds timeout, std::optional<int64_t> up_to,
                                  const std::function<bool()>& give_up) {
  State& s = *state_;
  std::unique_lock<std::mutex> lock(s.mu);
  std::vector<std::shared_ptr<AdapterLease::Entry>> targets;
  for (const auto& e : s.entries) {
    if (e->name == name && (!version || e->version == *version) &&
        (!up_to || e->version <= *up_to)) {
      targets.push_back(e);
    }
  }
  // Bounded: the versions the caller saw were replaced and freed meanwhile; nothing to wait for.
  if (targets.empty() && up_to && *up_to > 0) return absl::OkStatus();
  if (targets.empty()) {
    return absl::NotFoundError(
        version ? absl::StrCat("adapter '", name, "' has no loaded version ", *version)
                : absl::StrCat("adapter '", name, "' is not loaded"));
  }
  bool retired = false;
  for (const auto& e : targets) {
    e->unloaded = true;
    if (e->current) {
      e->current = false;
      s.current.erase(name);
      retired = true;
    }
    s.MaybeFree(e);
  }
  s.NotifyGone(lock);
  if (retired) s.NotifyRetired(lock);
  const auto all_freed = [&] {
    return std::none_of(targets.begin(), targets.end(), [](const auto& e) { return e->alive; });
  };
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!s.released.wait_until(
      lock, std::min(deadline, std::chrono::steady_clock::now() + std::chrono::milliseconds(100)),
      [&] { return all_freed() || s.unload_waits_ended; })) {
    if (std::chrono::steady_clock::now() >= deadline) break;
    if (give_up && give_up()) {
      return absl::CancelledError(absl::StrCat("the unload of adapter '", name,
                                               "' stopped waiting for its running requests; "
                                               "it will be freed when they end"));
    }
  }
  const bool freed = all_freed();
  if (!freed) {
    return absl::DeadlineExceededError(
        absl::StrCat("adapter '", name, "' is still used by running requests after ",
                     timeout.count(), " ms; it will be freed when they end"));
  }
  return absl::OkStatus();
}

std::vector<AdapterInfo> AdapterStore::List() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  std::vector<AdapterInfo> out;
  for (const auto& e : state_->entries) out.push_back(InfoOf(*e));
  std::sort(out.begin(), out.end(), [](const AdapterInfo& a, const AdapterInfo& b) {
    return std::tie(a.name, a.version) < std::tie(b.name, b.version);
  });
  return out;
}

int32_t AdapterStore::resident_count() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->Resident();
}

int64_t AdapterStore::resident_bytes() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  int64_t n = 0;
  for (const auto& e : state_->entries) {
    if (e->device != nullptr) n += e->device->bytes();
  }
  return n;
}

int64_t AdapterStore::host_bytes() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  int64_t n = 0;
  for (const auto& e : state_->entries) n += HostBytes(*e->host);
  return n;
}

}  // namespace lorad::engine
