// Daemon::FollowMovedFolders: the data folder (or a storage root) moved since the last start, and
// the paths the job database holds follow it (daemon.h).
#include <algorithm>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "lorad/v1/training.pb.h"
#include "server/daemon.h"
#include "spdlog/spdlog.h"

namespace lorad::server {

absl::Status Daemon::FollowMovedFolders() {
  namespace fs = std::filesystem;
  // The folders as configured (absolute) and with symlinks resolved (dataset paths are stored
  // resolved, job adapter folders as configured).
  const std::string adapter_root = config_.storage.adapter_root.empty()
                                       ? (fs::path(config_.storage.data_dir) / "adapters").string()
                                       : config_.storage.adapter_root;
  // The resolved forms first: where a folder's old plain and resolved forms are the same path
  // (the folder is now reached through a symlink), the resolved new one is the place itself,
  // which dataset paths, stored resolved, must keep.
  std::vector<std::pair<std::string, std::string>> now, plain;  // (meta key, folder)
  for (const auto& [key, folder] :
       {std::pair{"data_dir", config_.storage.data_dir}, std::pair{"dataset_root", dataset_root_},
        std::pair{"adapter_root", adapter_root}}) {
    std::error_code ec;
    const fs::path canonical = fs::weakly_canonical(folder, ec);
    const std::string normal = fs::path(folder).lexically_normal().string();
    plain.emplace_back(key, normal);
    now.emplace_back(absl::StrCat(key, ".resolved"), ec ? normal : canonical.string());
  }
  now.insert(now.end(), plain.begin(), plain.end());
  // Where each was at the last start -> where it is now; the longest match wins (then the
  // resolved form), so a root that stayed keeps its paths even inside a data folder that moved.
  // The data folder holds the job database itself: found at a new place, it was moved or copied,
  // and what is in it follows, a root inside it where it is at the same place in the new one. A
  // root otherwise moved only where the old place is gone (or is the same folder, reached another
  // way): one pointed at another folder while the old one is still there is a change, and the
  // paths recorded under the old one keep naming their files (rewritten into the new root, a
  // queued job trained on another file of the same name).
  std::map<std::string, std::string> before_of, now_of;  // meta key -> the folder then, now
  for (const auto& [key, folder] : now) {
    now_of[key] = folder;
    auto before = jobs_->GetMeta(key);
    if (!before.ok()) return before.status();
    if (!before->has_value()) continue;
    std::string old_place = **before;  // recorded with a trailing separator by older lorad
    while (old_place.size() > 1 && old_place.back() == '/') old_place.pop_back();
    before_of[key] = old_place;
  }
  // Where `key`'s old root is now: inside a data folder that moved, at its place in the new one.
  const auto old_root_now = [&](const std::string& key, const std::string& old_root) {
    const std::string data_key =
        absl::EndsWith(key, ".resolved") ? "data_dir.resolved" : "data_dir";
    const auto old_data = before_of.find(data_key);
    if (old_data == before_of.end() || !absl::StartsWith(old_root, old_data->second + "/")) {
      return old_root;
    }
    return now_of[data_key] + old_root.substr(old_data->second.size());
  };
  std::vector<std::pair<std::string, std::string>> moves;
  bool moved = false;
  for (const auto& [key, folder] : now) {
    auto found = before_of.find(key);
    if (found == before_of.end()) continue;
    const std::string& old_place = found->second;
    // A root inside the data folder is judged where the data folder is now (moved, its old
    // place is gone with it, while its files are still there, in the new one).
    const std::string there = old_root_now(key, old_place);
    // Empty counts as gone: lorad creates a root it does not find, so a start before the
    // config named the new place left an empty folder at the old one (which then kept the
    // paths on it for good).
    std::error_code gone_ec, empty_ec, same_ec;
    const bool gone =
        (!fs::exists(there, gone_ec) && !gone_ec) || (fs::is_empty(there, empty_ec) && !empty_ec);
    const bool same = fs::equivalent(there, folder, same_ec) && !same_ec;
    // The data folder itself, or a root inside it at the same place in the new one.
    const bool follows_data_dir = absl::StartsWith(key, "data_dir") || there == folder;
    if (old_place != folder && !gone && !same && !follows_data_dir) {
      if (absl::EndsWith(key, ".resolved")) {
        // Said once, for the folder as configured.
      } else if (there == old_place) {
        spdlog::info(
            "{} is {} now, {} at the last start (still there): the paths recorded "
            "under the old place stay as they are",
            key, folder, old_place);
      } else {
        spdlog::info(
            "{} is {} now, {} at the last start, which moved with the data folder to {}: the "
            "paths recorded under it follow it there, not into {}",
            key, folder, old_place, there, folder);
      }
      moves.emplace_back(old_place, there);  // paths under it stay (or follow the data folder)
      moved |= there != old_place;
      continue;
    }
    moves.emplace_back(old_place, folder);
    moved |= old_place != folder;
  }
  if (moved) {
    std::stable_sort(moves.begin(), moves.end(),
                     [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    const auto relocate = [&moves](const std::string& path) -> std::optional<std::string> {
      for (const auto& [before, after] : moves) {
        if (path == before || absl::StartsWith(path, before + "/")) {
          return before == after ? std::optional<std::string>()
                                 : std::optional<std::string>(after + path.substr(before.size()));
        }
      }
      return std::nullopt;
    };
    const auto rewrite_spec = [&relocate](const std::string& blob) -> std::optional<std::string> {
      lorad::v1::JobSpec spec;
      if (!spec.ParseFromString(blob)) return std::nullopt;
      bool changed = false;
      for (std::string* path :
           {spec.mutable_dataset()->mutable_path(),
            spec.mutable_dataset()->mutable_validation_path(), spec.mutable_init_adapter_path()}) {
        if (auto moved_path = relocate(*path)) {
          *path = *std::move(moved_path);
          changed = true;
        }
      }
      return changed ? std::optional<std::string>(spec.SerializeAsString()) : std::nullopt;
    };
    // The paths jobs reported: checkpoints, and the summary's outputs.
    const auto rewrite_event = [&relocate](const std::string& blob) -> std::optional<std::string> {
      lorad::v1::JobEvent event;
      if (!event.ParseFromString(blob)) return std::nullopt;
      // Only the event's own case: a mutable_ accessor of another would switch the oneof.
      std::vector<std::string*> paths;
      if (event.has_checkpoint()) paths.push_back(event.mutable_checkpoint()->mutable_path());
      if (event.has_finished()) {
        lorad::v1::JobSummary* summary = event.mutable_finished();
        paths.insert(paths.end(),
                     {summary->mutable_adapter_path(), summary->mutable_merged_model_path(),
                      summary->mutable_eval_report_path()});
      }
      bool changed = false;
      for (std::string* path : paths) {
        if (auto moved_path = relocate(*path)) {
          *path = *std::move(moved_path);
          changed = true;
        }
      }
      return changed ? std::optional<std::string>(event.SerializeAsString()) : std::nullopt;
    };
    auto rewritten = jobs_->RewritePaths(rewrite_spec, rewrite_event, relocate);
    if (!rewritten.ok()) return rewritten.status();
    if (*rewritten > 0) {
      spdlog::warn(
          "the data folder (or a root in storage) moved since the last start; {} recorded "
          "dataset, adapter and output paths now point at the new place",
          *rewritten);
    }
  }
  for (const auto& [key, folder] : now) {
    if (auto s = jobs_->SetMeta(key, folder); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace lorad::server
