#include "engine/runtime/file_fingerprint.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/runtime/durable_file.h"

namespace lorad::engine {

absl::StatusOr<std::string> FilesFingerprint(const std::vector<std::string>& paths,
                                             const std::atomic<bool>* abandon) {
  std::string out;
  std::vector<unsigned char> buffer(1 << 20);
  for (const std::string& path : paths) {
    // Opened without waiting on a named pipe in the file's place (it would hold its caller: a
    // job's start, SubmitJob, the daemon's start) and refused unless a regular file.
    auto opened = OpenRegularFile(path, absl::StrCat("'", path, "'"));
    if (!opened.ok()) return opened.status();
    const int fd = *opened;
    uint64_t hash = kFnv1aBasis;
    uint64_t size = 0;
    while (true) {
      if (abandon != nullptr && abandon->load()) {
        ::close(fd);
        return absl::CancelledError(absl::StrCat("reading '", path, "' was abandoned"));
      }
      const ssize_t n = ::read(fd, buffer.data(), buffer.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        const int err = errno;
        ::close(fd);
        return absl::InvalidArgumentError(
            absl::StrCat("'", path, "' cannot be read: ", std::strerror(err)));
      }
      if (n == 0) break;
      MixFnv1a(&hash, buffer.data(), static_cast<size_t>(n));
      size += static_cast<uint64_t>(n);
    }
    ::close(fd);
    absl::StrAppend(&out, out.empty() ? "" : ";", size, ":", absl::Hex(hash, absl::kZeroPad16));
  }
  return out;
}

}  // namespace lorad::engine
