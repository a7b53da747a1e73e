#include "server/path_policy.h"

#include <filesystem>

#include "absl/strings/str_cat.h"

namespace lorad::server {

absl::StatusOr<std::string> ResolveInsideRoot(const std::string& root, const std::string& requested,
                                              const std::string& field) {
  namespace fs = std::filesystem;
  if (requested.empty()) return absl::InvalidArgumentError(absl::StrCat(field, ": is empty"));
  if (requested.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": contains a NUL byte"));
  }
  std::error_code ec;
  const fs::path canonical_root = fs::weakly_canonical(fs::absolute(root, ec), ec);
  if (ec) {
    return absl::FailedPreconditionError(absl::StrCat(field, ": the configured root '", root,
                                                      "' cannot be resolved: ", ec.message()));
  }
  fs::path candidate(requested);
  if (candidate.is_relative()) candidate = canonical_root / candidate;
  // weakly_canonical resolves symlinks in the existing prefix and folds "..", so a symlink that
  // leaves the root is caught like a literal "../".
  const fs::path resolved = fs::weakly_canonical(candidate, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": '", requested, "' cannot be resolved: ", ec.message()));
  }
  auto r = canonical_root.begin();
  auto p = resolved.begin();
  for (; r != canonical_root.end() && !r->empty(); ++r, ++p) {
    if (p == resolved.end() || *p != *r) {
      // Where it leads is not said: that would tell a caller what lies outside the root.
      return absl::PermissionDeniedError(absl::StrCat(
          field, ": '", requested, "' leads outside the root '", canonical_root.string(),
          "' that the server allows for it (symlinks are "
          "followed)"));
    }
  }
  return resolved.string();
}

absl::StatusOr<std::string> ResolveAdapterFolder(const std::string& root, const std::string& path,
                                                 const std::string& field) {
  auto folder = ResolveInsideRoot(root, path, field);
  if (!folder.ok()) return folder.status();
  for (const char* file : {"adapter_config.json", "adapter_model.safetensors"}) {
    const std::string inside = absl::StrCat(*folder, "/", file);
    std::error_code ec;
    if (!std::filesystem::exists(std::filesystem::symlink_status(inside, ec))) continue;
    auto resolved = ResolveInsideRoot(root, inside, field);
    if (!resolved.ok()) return resolved.status();
  }
  return folder;
}

}  // namespace lorad::server
