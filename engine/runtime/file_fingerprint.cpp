#include "engine/runtime/file_fingerprint.h"

#include <cstdint>
#include <fstream>

#include "absl/strings/str_cat.h"

namespace lorad::engine {

absl::StatusOr<std::string> FilesFingerprint(const std::vector<std::string>& paths,
                                             const std::atomic<bool>* abandon) {
  std::string out;
  std::vector<char> buffer(1 << 20);
  for (const std::string& path : paths) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("'", path, "' cannot be read"));
    uint64_t hash = 14695981039346656037ULL;
    uint64_t size = 0;
    while (in.read(buffer.data(), static_cast<std::streamsize>(buffer.size())) || in.gcount()) {
      if (abandon != nullptr && abandon->load()) {
        return absl::CancelledError(absl::StrCat("reading '", path, "' was abandoned"));
      }
      for (std::streamsize i = 0; i < in.gcount(); ++i) {
        hash = (hash ^ static_cast<unsigned char>(buffer[i])) * 1099511628211ULL;
      }
      size += static_cast<uint64_t>(in.gcount());
    }
    absl::StrAppend(&out, out.empty() ? "" : ";", size, ":", absl::Hex(hash, absl::kZeroPad16));
  }
  return out;
}

}  // namespace lorad::engine
