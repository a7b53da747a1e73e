// Daemon::ServeRecordedAdapters: at start, the adapters that were served at the last stop are
// published again with the same versions, read and checked on a few threads (daemon.h).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/lora/peft_config.h"
#include "engine/runtime/durable_file.h"
#include "lorad/v1/training.pb.h"
#include "server/daemon.h"
#include "server/path_policy.h"
#include "spdlog/spdlog.h"

namespace lorad::server {
namespace {

// Threads reading recorded adapters at start. Each holds one adapter's fp32 tensors while it
// reads (168 MB at the 8B shape, r=16 on every projection), so not one per core.
constexpr unsigned kMaxRestoreThreads = 4;

}  // namespace

absl::StatusOr<std::string> Daemon::RecordedAdapterFolder(const ServedAdapter& a) const {
  // The folder must still be where the roots allow (it may have been replaced by a symlink to
  // elsewhere while lorad was stopped); that it holds the files it was loaded from is checked
  // once they are read (ServeRecordedAdapters).
  const bool from_job = a.source.rfind("job:", 0) == 0;
  return ResolveAdapterFolder(from_job ? JobsDir() : adapter_root_, a.path,
                              from_job ? "the job's adapter folder" : "storage.adapter_root");
}

bool Daemon::TookModelsOwnTemplate(const std::string& source) {
  if (source.rfind("job:", 0) != 0) return false;
  auto job = jobs_->Get(source.substr(4));
  lorad::v1::JobSpec spec;
  if (!job.ok() || !spec.ParseFromString(job->spec)) return false;
  return engine::TakesModelsOwnTemplate(spec.dataset().template_());
}

absl::Status Daemon::ServeRecordedAdapters() {
  auto recorded = jobs_->Adapters();
  if (!recorded.ok()) {
    // Started anyway, every name would count its versions from 1 again: a client that saw v5
    // would see v1, and a load would be answered while its record stayed the older v5.
    return absl::DataLossError(
        absl::StrCat("storage.data_dir: the adapter records in ",
                     (std::filesystem::path(config_.storage.data_dir) / "jobs.db").string(),
                     " cannot be read (", recorded.status().message(), "); ", kRestoreAdvice,
                     ", or move it aside to start with no jobs or adapters"));
  }
  std::vector<ServedAdapter> adapters = *std::move(recorded);
  // A data folder from before lorad recorded adapters (its first start since): the newest
  // succeeded job of each name. Every later success is recorded with the job's state.
  if (adapters.empty()) {
    std::set<std::string> names;
    std::string page_token;
    do {
      auto page = jobs_->List({JobState::kSucceeded}, 500, page_token);
      if (!page.ok()) break;
      for (const JobRecord& job : page->jobs) {  // newest first
        if (!names.insert(job.adapter_name).second) continue;
        adapters.push_back({job.adapter_name, job.adapter_version,
                            (std::filesystem::path(JobsDir()) / job.id / "adapter").string(),
                            "job:" + job.id, /*served=*/true, /*fingerprint=*/""});
        (void)jobs_->RecordAdapter(adapters.back());
      }
      page_token = page->next_page_token;
    } while (!page_token.empty());
  }

  // An adapter published on another base model than this one (another revision or fine-tune of
  // the same shapes) serves again, as PEFT would load it onto this one, but the operator is told.
  // Each adapter's own base where its record has one; else (an older lorad's record) the last
  // start's. (Compared with the last start's alone, going back to the original folder named the
  // adapters made on it, and a second start on the other named none.)
  const std::string current_base = engine_->base_fingerprint();
  auto last = jobs_->GetMeta("base_model_fingerprint");
  const std::string last_base = last.ok() && last->has_value() ? **last : current_base;
  // A record whose base is not known takes the last start's, once: later starts compare with
  // that, not with whichever base the start before them had.
  if (auto s = jobs_->FillUnknownAdapterBases(last_base); !s.ok()) {
    spdlog::warn("the adapters' base models could not be recorded: {}", std::string(s.message()));
  }
  jobs_->SetBaseFingerprint(current_base);
  struct Outcome {
    bool served = false;
    int64_t version = 0;
    bool other_base = false;  // made on another base model than this one
    // Published by a job that took the model's own template ("auto", "chat"): a job naming its
    // template trained on that one whatever model.chat_template says.
    bool trained_here = false;
  };
  std::vector<Outcome> outcomes(adapters.size());
  engine::AdapterStore& store = engine_->adapters();
  const auto serve_again = [&](size_t i) {
    const ServedAdapter& a = adapters[i];
    if (!a.served) {
      store.ContinueVersionsAfter(a.name, a.version);
      return;
    }
    const absl::StatusOr<std::string> folder = RecordedAdapterFolder(a);
    absl::Status refused = folder.status();
    if (refused.ok()) {
      store.ContinueVersionsAfter(a.name, a.version - 1);  // so it comes back as that version
      // The files it was loaded from, checked once read (before, files replaced between a check
      // and the read would have served as this version).
      const auto same_files = [&](int64_t) {
        if (a.fingerprint.empty() ||
            engine::PeftFolderFingerprint(*folder).value_or("") == a.fingerprint) {
          return absl::OkStatus();
        }
        const bool of_a_job = a.source.rfind("job:", 0) == 0;
        return absl::FailedPreconditionError(absl::StrCat(
            a.path, " holds other files than when version ", a.version,
            of_a_job ? " was published by its job; copy the folder into the adapter root and "
                       "load it to serve them, or train the adapter again"
                     : " was loaded; load it again to serve them as a new version"));
      };
      absl::StatusOr<int64_t> version;
      try {
        const engine::ScopedConfinedReads confined(  // read as LoadAdapter reads them
            a.source.rfind("job:", 0) == 0 ? JobsDir() : adapter_root_);
        version = store.LoadPeft(a.name, *folder, a.source, nullptr, same_files);
      } catch (const std::exception& e) {  // e.g. bad_alloc: this one is not served, lorad starts
        version = absl::ResourceExhaustedError(absl::StrCat("reading it failed: ", e.what()));
      }
      if (version.ok()) {
        spdlog::info("adapter {} version {} served again (from {})", a.name, *version, a.path);
        Outcome& out = outcomes[i];
        out.served = true;
        out.version = *version;
        out.trained_here = TookModelsOwnTemplate(a.source);
        const std::string& made_on = a.base_fingerprint.empty() ? last_base : a.base_fingerprint;
        if (made_on != current_base) {
          out.other_base = true;
          store.MarkOtherBase(a.name, *version);
        }
        return;
      }
      refused = version.status();
    }
    store.ContinueVersionsAfter(a.name, a.version);
    spdlog::warn("adapter {} version {} is not served again: {}", a.name, a.version,
                 std::string(refused.message()));
    store.NoteNotServedAgain(
        a.name, absl::StrCat("version ", a.version,
                             " was not served again at start-up: ", refused.message()));
  };
  // On a few threads: each adapter is read and hashed (an 8B-shaped one at rank 16 on every
  // projection: 168 MB), and one after another a hundred took most of a minute before lorad
  // served. A name has one record (the adapters table's key), so the records are independent.
  const auto started = std::chrono::steady_clock::now();
  std::atomic<size_t> next{0};
  const auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < adapters.size();) serve_again(i);
  };
  const size_t threads = std::min<size_t>(
      {adapters.size(), kMaxRestoreThreads, std::max(1u, std::thread::hardware_concurrency())});
  std::vector<std::thread> helpers;
  for (size_t t = 1; t < threads; ++t) {
    try {
      helpers.emplace_back(work);
    } catch (const std::system_error&) {
      break;  // the threads started and this one do the rest
    }
  }
  work();
  for (std::thread& t : helpers) t.join();
  std::vector<std::string> other_base, trained_here;
  int64_t served = 0;
  for (size_t i = 0; i < adapters.size(); ++i) {
    const Outcome& out = outcomes[i];
    if (!out.served) continue;
    ++served;
    if (out.trained_here) trained_here.push_back(adapters[i].name);
    if (out.other_base) other_base.push_back(absl::StrCat(adapters[i].name, " v", out.version));
  }
  if (served > 0) {
    spdlog::info("{} adapter(s) served again in {:.1f} s ({} thread(s))", served,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count(),
                 helpers.size() + 1);
  }
  if (!other_base.empty()) {
    spdlog::warn(
        "the base model in {} is not the one {} adapter(s) served again were trained or loaded "
        "on (its config, tokenizer or weights differ) and they may not fit it: {} (unload them, "
        "or start lorad on the model folder they were made on)",
        config_.model.path, other_base.size(), absl::StrJoin(other_base, ", "));
  }
  // The operator's model.chat_template renders every Chat, and a job that takes the model's own
  // template trains on the one rendered then: changed since the last start, Chat prompts those
  // adapters in a form they did not learn (their answers change, silently).
  const std::string& template_now = config_.model.chat_template;
  auto template_then = jobs_->GetMeta("model_chat_template");
  if (template_then.ok() && template_then->has_value() && **template_then != template_now &&
      !trained_here.empty()) {
    const auto describe = [](const std::string& name) {
      return name.empty() ? std::string("\"\" (the model folder's own)") : "'" + name + "'";
    };
    spdlog::warn(
        "model.chat_template is {} now but was {} at the last start: Chat renders the new one "
        "for adapters that jobs trained on the model's own template under the old one, and "
        "their answers may change: {} (set it back, or train them again)",
        describe(template_now), describe(**template_then), absl::StrJoin(trained_here, ", "));
  }
  if (auto s = jobs_->SetMeta("model_chat_template", template_now); !s.ok()) return s;
  return jobs_->SetMeta("base_model_fingerprint", current_base);
}

}  // namespace lorad::server
