#include "engine/train/checkpoint_folders.h"

#include "absl/strings/str_cat.h"

namespace lorad::engine {

namespace fs = std::filesystem;

std::string CheckpointPath(const std::string& output_dir, int64_t step) {
  return (fs::path(output_dir) / absl::StrCat(kCheckpointPrefix, step)).string();
}

const std::vector<std::string>& CheckpointFiles() {
  static const std::vector<std::string> kFiles = {"trainer_state.json", "optimizer.pt", "rng.pt",
                                                  "adapter/adapter_config.json",
                                                  "adapter/adapter_model.safetensors"};
  return kFiles;
}

std::vector<CheckpointFolder> CheckpointFolders(const std::string& output_dir) {
  constexpr size_t kPrefixLength = sizeof(kCheckpointPrefix) - 1;
  std::vector<CheckpointFolder> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(output_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(kCheckpointPrefix, 0) != 0 || !entry.is_directory()) continue;
    int64_t step = -1;
    try {
      size_t used = 0;
      step = std::stoll(name.substr(kPrefixLength), &used);
      if (used != name.size() - kPrefixLength) continue;
    } catch (...) {
      continue;
    }
    CheckpointFolder folder{step, entry.path(), ""};
    for (const std::string& file : CheckpointFiles()) {
      if (folder.missing.empty() && !fs::is_regular_file(entry.path() / file, ec)) {
        folder.missing = file;
      }
    }
    found.push_back(std::move(folder));
  }
  return found;
}

std::vector<std::pair<int64_t, fs::path>> CompleteCheckpoints(const std::string& output_dir) {
  std::vector<std::pair<int64_t, fs::path>> complete;
  for (CheckpointFolder& f : CheckpointFolders(output_dir)) {
    if (f.missing.empty()) complete.emplace_back(f.step, std::move(f.path));
  }
  return complete;
}

std::string LatestCheckpoint(const std::string& output_dir) {
  int64_t best = -1;
  std::string path;
  for (const auto& [step, folder] : CompleteCheckpoints(output_dir)) {
    if (step > best) {
      best = step;
      path = folder.string();
    }
  }
  return path;
}

void RemoveFolder(const fs::path& folder) {
  std::error_code ec;
  const fs::path doomed = folder.parent_path() / (".deleting-" + folder.filename().string());
  fs::remove_all(doomed, ec);
  fs::rename(folder, doomed, ec);
  fs::remove_all(ec ? folder : doomed, ec);
}

void RestoreReplacedFolders(const std::string& output_dir) {
  constexpr std::string_view kReplaced = ".replaced-";
  std::error_code ec;
  std::vector<fs::path> replaced;  // first: they are renamed below
  for (const auto& entry : fs::directory_iterator(output_dir, ec)) {
    if (entry.path().filename().string().rfind(kReplaced, 0) == 0) replaced.push_back(entry.path());
  }
  for (const fs::path& aside : replaced) {
    const fs::path original =
        aside.parent_path() / aside.filename().string().substr(kReplaced.size());
    if (!fs::exists(original, ec) && !ec) fs::rename(aside, original, ec);
  }
}

void RemoveLeftovers(const std::string& output_dir) {
  RestoreReplacedFolders(output_dir);
  std::error_code ec;
  std::vector<fs::path> leftovers;
  for (const auto& entry : fs::directory_iterator(output_dir, ec)) {
    const std::string name = entry.path().filename().string();
    const auto starts = [&](const std::string& prefix) { return name.rfind(prefix, 0) == 0; };
    const bool tmp = starts(absl::StrCat(".", kCheckpointPrefix)) && name.size() > 4 &&
                     name.compare(name.size() - 4, 4, ".tmp") == 0;
    // The job's other writers' work in progress: LoraAdapter::WritePeft's temporary folders for
    // adapter/ and best-adapter/, WriteMergedModel's merged.tmp, WriteFileAtomically's
    // eval_report.json.tmp.
    const bool end_tmp = starts(".adapter.tmp-") || starts(".best-adapter.tmp-") ||
                         name == "merged.tmp" || name == "eval_report.json.tmp";
    // ".replaced-": one RestoreReplacedFolders left, the new folder having taken its name.
    if (tmp || end_tmp || starts(".deleting-") || starts(".replaced-")) {
      leftovers.push_back(entry.path());
    }
  }
  for (const fs::path& p : leftovers) fs::remove_all(p, ec);
}

}  // namespace lorad::engine
