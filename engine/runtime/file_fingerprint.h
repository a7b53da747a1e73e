// FilesFingerprint: what a set of files held, as "<size>:<FNV-1a 64 of the bytes>" per file,
// ";"-joined. Enough to tell that a dataset or an adapter folder changed between two reads (not a
// defence against a crafted file: the operator owns these files). Torch-free; reads each file
// once, in 1 MiB pieces.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace lorad::engine {

// The first file that cannot be read is an error naming it, with ReadRegularFile's codes
// (durable_file.h): NOT_FOUND when missing, INVALID_ARGUMENT when not a regular file (a named pipe
// is refused, not waited on) or unreadable; CANCELLED soon after `*abandon` turns true (a large
// file takes about a second a GB).
absl::StatusOr<std::string> FilesFingerprint(const std::vector<std::string>& paths,
                                             const std::atomic<bool>* abandon = nullptr);

// FNV-1a 64 over `n` bytes, continuing from `*hash` (start from kFnv1aBasis): the hash of
// FilesFingerprint and ModelFolderFingerprint.
inline constexpr uint64_t kFnv1aBasis = 14695981039346656037ULL;
inline void MixFnv1a(uint64_t* hash, const void* data, size_t n) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) *hash = (*hash ^ bytes[i]) * 1099511628211ULL;
}

}  // namespace lorad::engine
