// JobRunner: deleting an ended job (DeleteJob): its record, history and folder, never a folder
// something still reads, and what a crash in the middle leaves sorted out at the next start.
#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/runtime/device_info.h"
#include "engine/train/checkpoint_folders.h"
#include "server/job_runner.h"
#include "spdlog/spdlog.h"

namespace lorad::server {
namespace {

namespace fs = std::filesystem;

// A deleted job's folder is renamed to this + its id before its record goes.
constexpr const char* kDeletedPrefix = ".deleted-";

// Whether `path` is `folder` or inside it, after symlinks (either may be relative, or not exist).
bool IsWithin(const fs::path& path, const fs::path& folder) {
  std::error_code ec;
  const fs::path p = fs::weakly_canonical(fs::absolute(path, ec), ec);
  const fs::path f = fs::weakly_canonical(fs::absolute(folder, ec), ec);
  const fs::path relative = p.lexically_relative(f);
  return !relative.empty() && *relative.begin() != "..";
}

}  // namespace

std::vector<std::string> FinishInterruptedDeletions(JobStore& store, const std::string& jobs_dir) {
  std::error_code ec;
  std::vector<fs::path> moved;
  for (fs::directory_iterator it(jobs_dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (absl::StartsWith(it->path().filename().string(), kDeletedPrefix)) {
      moved.push_back(it->path());
    }
  }
  std::vector<std::string> to_remove;
  for (const fs::path& path : moved) {
    const std::string id = path.filename().string().substr(std::string(kDeletedPrefix).size());
    auto record = store.Get(id);
    if (record.ok()) {  // stopped before its record went: the job stays, with its files
      std::error_code restored;
      fs::rename(path, fs::path(jobs_dir) / id, restored);
      if (restored) {
        spdlog::warn("job {}: its deletion was interrupted, and its folder {} cannot go back: {}",
                     id, path.string(), restored.message());
      } else {
        spdlog::warn("job {}: its deletion was interrupted; the job is kept", id);
      }
    } else if (absl::IsNotFound(record.status())) {
      to_remove.push_back(path.string());
    }  // else the store cannot say: left for the next start
  }
  return to_remove;
}

bool RemoveTree(const std::string& folder, const std::atomic<bool>* stop, std::error_code& ec) {
  // Entry by entry (a checkpoint folder each, mostly), so that a stop is not held up for long.
  std::vector<fs::path> entries;
  for (fs::directory_iterator it(folder, ec), end; !ec && it != end; it.increment(ec)) {
    entries.push_back(it->path());
  }
  if (ec) return false;
  for (const fs::path& entry : entries) {
    if (stop != nullptr && stop->load()) return false;
    fs::remove_all(entry, ec);
    if (ec) return false;
  }
  fs::remove_all(folder, ec);
  return !ec;
}

int64_t RemoveCheckpointsAndExport(const std::string& folder) {
  int64_t removed = 0;
  std::error_code ec;
  std::vector<fs::path> doomed;
  for (fs::directory_iterator it(folder, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    // checkpoint-N, and a crash's .checkpoint-N.tmp and .replaced-checkpoint-N
    const absl::string_view checkpoint = engine::kCheckpointPrefix;
    if (absl::StartsWith(name, checkpoint) ||
        absl::StartsWith(name, absl::StrCat(".", checkpoint)) ||
        absl::StartsWith(name, absl::StrCat(".replaced-", checkpoint)) || name == "merged" ||
        name == "merged.tmp") {
      doomed.push_back(it->path());
    }
  }
  for (const fs::path& path : doomed) {
    int64_t bytes = 0;
    std::error_code walk;
    for (fs::recursive_directory_iterator it(path, walk), end; !walk && it != end;
         it.increment(walk)) {
      std::error_code size;
      if (it->is_regular_file(size)) bytes += static_cast<int64_t>(it->file_size(size));
    }
    if (fs::remove_all(path, ec) != static_cast<std::uintmax_t>(-1) && !ec) removed += bytes;
  }
  return removed;
}

void JobRunner::RemoveInBackground(std::vector<std::string> folders) {
  if (folders.empty()) return;
  spdlog::info("removing {} folder(s) of deleted jobs in the background", folders.size());
  leftovers_ = std::thread([this, folders = std::move(folders)] {
    for (const std::string& folder : folders) {
      std::error_code ec;
      if (!RemoveTree(folder, &stop_removing_, ec) && ec) {
        spdlog::warn("cannot remove {}, left by a deleted job: {}", folder, ec.message());
      }
    }
  });
}

absl::Status JobRunner::CheckFolderUnread(const std::string& job_id, const fs::path& folder) {
  // A restart serves every served adapter again from its folder.
  auto adapters = store_.ServedAdapters();
  if (!adapters.ok()) return adapters.status();
  for (const ServedAdapter& a : *adapters) {
    if (a.served && IsWithin(a.path, folder)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job '", job_id, "': adapter '", a.name, "' (version ", a.version,
          ") is served from its folder ", a.path,
          "; unload the adapter first (UnloadAdapter), or load a copy from the adapter root "
          "under the same name, then delete the job"));
    }
  }
  // A job waiting to continue an adapter of this folder reads it when it starts.
  std::string page_token;
  do {
    auto page = store_.List({JobState::kQueued, JobState::kRunning}, 500, page_token);
    if (!page.ok()) return page.status();
    for (const JobRecord& waiting : page->jobs) {
      lorad::v1::JobSpec spec;
      if (spec.ParseFromString(waiting.spec) && !spec.init_adapter_path().empty() &&
          IsWithin(spec.init_adapter_path(), folder)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "job '", job_id, "': job '", waiting.id, "' (", JobStateName(waiting.state),
            ") continues adapter '", spec.init_adapter(), "' from its folder ",
            spec.init_adapter_path(), "; delete the job once that one has ended"));
      }
    }
    page_token = page->next_page_token;
  } while (!page_token.empty());
  return absl::OkStatus();
}

absl::Status JobRunner::DeleteJob(const std::string& job_id, const std::atomic<bool>* stop) {
  std::unique_lock<std::mutex> folders(folders_mu_);
  auto record = store_.Get(job_id);
  if (!record.ok()) return record.status();
  if (!IsTerminal(record->state)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job '", job_id, "' is ", JobStateName(record->state),
        "; only an ended job can be deleted: cancel it first (CancelJob, or loradctl train "
        "cancel), then delete it"));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (running_.count(job_id) > 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job '", job_id,
          "' is cancelled but its trainer is still stopping (it may be writing a checkpoint or "
          "its merged export); delete it once it has stopped, in a few seconds"));
    }
  }
  const fs::path folder = fs::path(jobs_dir_) / job_id;
  if (auto s = CheckFolderUnread(job_id, folder); !s.ok()) return s;
  const fs::path doomed = fs::path(jobs_dir_) / (kDeletedPrefix + job_id);
  std::error_code ec;
  const bool has_folder = fs::exists(folder, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("job '", job_id, "': cannot look at its folder ",
                                            folder.string(), " (", ec.message(),
                                            "); nothing was deleted"));
  }
  if (has_folder) {
    fs::rename(folder, doomed, ec);
    if (ec) {
      return absl::InternalError(absl::StrCat("job '", job_id, "': cannot move its folder ",
                                              folder.string(), " aside (", ec.message(),
                                              "); nothing was deleted"));
    }
  }
  if (absl::Status deleted = store_.Delete(job_id); !deleted.ok()) {
    // The database's disk is full: deleting a job is how a user frees space, and the delete
    // itself needs some. What only the job's resume and export needed goes now (the job stays,
    // with its adapter and reports), so that deleting it again goes through.
    int64_t freed = 0;
    if (has_folder && absl::IsResourceExhausted(deleted)) {
      freed = RemoveCheckpointsAndExport(doomed.string());
    }
    if (has_folder) {
      fs::rename(doomed, folder, ec);
      if (ec) {
        spdlog::error(
            "job {}: its record could not be deleted, and its folder {} not moved back "
            "from {}: {}",
            job_id, folder.string(), doomed.string(), ec.message());
      }
    }
    if (freed > 0) {
      spdlog::warn(
          "job {}: its record could not be deleted ({}); its checkpoints and merged "
          "export ({}) were removed to make room",
          job_id, std::string(deleted.message()), engine::ReadableBytes(freed));
      return absl::ResourceExhaustedError(absl::StrCat(deleted.message(), "; job '", job_id,
                                                       "' is kept, but its checkpoints and "
                                                       "merged export (",
                                                       engine::ReadableBytes(freed),
                                                       ") were removed to make "
                                                       "room: delete it again"));
    }
    return deleted;
  }
  // The job is gone: its files go without holding up the runner (a large folder takes a while).
  folders.unlock();
  if (has_folder && !RemoveTree(doomed.string(), stop, ec)) {
    if (ec) {
      spdlog::warn(
          "job {} deleted; some of its files in {} could not be removed ({}); lorad tries "
          "again at its next start",
          job_id, doomed.string(), ec.message());
    } else {
      spdlog::info(
          "job {} deleted; lorad is stopping: the rest of its files in {} go at its "
          "next start",
          job_id, doomed.string());
    }
  }
  spdlog::info("job {} ({}, {}) deleted", job_id, record->adapter_name,
               JobStateName(record->state));
  return absl::OkStatus();
}

}  // namespace lorad::server
