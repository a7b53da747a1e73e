#include "engine/train/checkpoint_folders.h"

#include "absl/strings/str_cat.h"

namespace lorad::engine {

namespace fs = std::filesystem;

std::string CheckpointPath(const std::string& output_dir, int64_t step) {
  return (fs::path(output_dir) / absl::StrCat(kCheckpointPrefix, step)).string();
}

std::vector<std::pair<int64_t, fs::path>> CompleteCheckpoints(const std::string& output_dir) {
  constexpr size_t kPrefixLength = sizeof(kCheckpointPrefix) - 1;
  std::vector<std::pair<int64_t, fs::path>> found;
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
    if (fs::exists(entry.path() / "trainer_state.json")) found.emplace_back(step, entry.path());
  }
  return found;
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

}  // namespace lorad::engine
