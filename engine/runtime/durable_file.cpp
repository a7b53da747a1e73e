#include "engine/runtime/durable_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/runtime/device_info.h"

#if __has_include(<linux/openat2.h>)
#include <linux/openat2.h>
#else  // older kernel headers: the ABI of Linux 5.6
struct open_how {
  uint64_t flags;
  uint64_t mode;
  uint64_t resolve;
};
#define RESOLVE_NO_SYMLINKS 0x04
#endif
#ifndef SYS_openat2
#define SYS_openat2 437  // the same number on every Linux architecture
#endif

namespace lorad::engine {

int OpenWithoutSymlinks(const std::string& path) {
  open_how how{};
  how.flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK;
  how.resolve = RESOLVE_NO_SYMLINKS;
  return static_cast<int>(syscall(SYS_openat2, AT_FDCWD, path.c_str(), &how, sizeof(how)));
}

absl::Status SyncPath(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return absl::InternalError(absl::StrCat("fsync ", path, ": ", std::strerror(err)));
  return absl::OkStatus();
}

absl::Status WriteSyncedFile(const std::string& path, const std::string& bytes, unsigned mode) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("cannot write ", path, ": ", std::strerror(errno)));
  }
  // A file left from an earlier write (a .tmp of a killed one, a file of an older lorad) keeps
  // its mode through O_CREAT: a private one is made private whatever it was (the umask only ever
  // takes permissions away, so 0600 is what O_CREAT would have given).
  if ((mode & 077) == 0 && ::fchmod(fd, mode) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::InternalError(
        absl::StrCat("cannot set the mode of ", path, ": ", std::strerror(err)));
  }
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      return absl::InternalError(
          absl::StrCat("cannot write ", path, ": ", std::strerror(err), " (disk full?)"));
    }
    done += static_cast<size_t>(n);
  }
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return absl::InternalError(absl::StrCat("fsync ", path, ": ", std::strerror(err)));
  return absl::OkStatus();
}

absl::Status WriteFileAtomically(const std::string& path, const std::string& bytes, unsigned mode) {
  const std::string tmp = path + ".tmp";
  if (auto s = WriteSyncedFile(tmp, bytes, mode); !s.ok()) {
    std::remove(tmp.c_str());
    return s;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return absl::InternalError(
        absl::StrCat("cannot rename ", tmp, " to ", path, ": ", std::strerror(err)));
  }
  const std::filesystem::path folder = std::filesystem::path(path).parent_path();
  return SyncPath(folder.empty() ? "." : folder.string());
}

namespace {

absl::Status CannotStat(int err, const std::string& what) {
  if (err == ENOENT || err == ENOTDIR) {
    return absl::NotFoundError(absl::StrCat(what, " does not exist"));
  }
  return absl::InvalidArgumentError(absl::StrCat(what, " cannot be read: ", std::strerror(err)));
}

// OK for a regular file, else InvalidArgument naming what it is.
absl::Status RegularOrError(const struct stat& st, const std::string& what) {
  if (S_ISREG(st.st_mode)) return absl::OkStatus();
  const char* kind = S_ISDIR(st.st_mode)                          ? "a directory"
                     : S_ISFIFO(st.st_mode)                       ? "a named pipe (FIFO)"
                     : S_ISSOCK(st.st_mode)                       ? "a socket"
                     : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device"
                                                                  : "not a regular file";
  return absl::InvalidArgumentError(absl::StrCat(what, " is ", kind, "; name a regular file"));
}

}  // namespace

absl::Status ReplaceFolder(const std::string& from, const std::string& to) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(from, ec);  // the old folder, swapped out
    return absl::OkStatus();
  }
  const int err = errno;
  if (err != EINVAL && err != ENOSYS && err != ENOTSUP) {
    return absl::InternalError(absl::StrCat("cannot replace ", to, ": ", std::strerror(err)));
  }
  // No swap on this filesystem: the old folder goes aside (the name is briefly empty), the new
  // one takes its name, then the old one is removed.
  const fs::path target(to);
  const fs::path aside = target.parent_path() / (".replaced-" + target.filename().string());
  fs::remove_all(aside, ec);
  if (::rename(to.c_str(), aside.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot move ", to, " aside: ", std::strerror(errno)));
  }
  if (::rename(from.c_str(), to.c_str()) != 0) {
    const int rename_err = errno;
    ::rename(aside.c_str(), to.c_str());  // the old one back
    return absl::InternalError(
        absl::StrCat("cannot rename ", from, " to ", to, ": ", std::strerror(rename_err)));
  }
  fs::remove_all(aside, ec);
  return absl::OkStatus();
}

absl::Status RequireRegularFile(const std::string& path, const std::string& what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return CannotStat(errno, what);
  return RegularOrError(st, what);
}

bool IsStorageFailure(const absl::Status& status) {
  if (status.ok() || absl::IsInvalidArgument(status) || absl::IsAlreadyExists(status) ||
      absl::IsCancelled(status)) {
    return false;
  }
  if (absl::IsResourceExhausted(status)) return true;
  for (int err : {ENOSPC, EDQUOT, EROFS, EACCES, EPERM, EIO, ENOTDIR, EEXIST}) {
    if (absl::StrContains(status.message(), std::strerror(err))) return true;
  }
  // torch's PytorchStreamWriter says only this; "(disk full?)" is WriteSyncedFile's.
  return absl::StrContains(status.message(), "file write failed") ||
         absl::StrContains(status.message(), "(disk full?)");
}

absl::Status RequireRoom(const std::string& folder, uint64_t bytes, const std::string& what) {
  std::error_code ec;
  const std::filesystem::space_info space = std::filesystem::space(folder, ec);
  if (ec || space.available >= bytes) return absl::OkStatus();
  return absl::ResourceExhaustedError(
      absl::StrCat(what, " needs ", ReadableBytes(static_cast<int64_t>(bytes)), " and ", folder,
                   " has ", ReadableBytes(static_cast<int64_t>(space.available)), " free"));
}

absl::Status RequireRegularDescriptor(int fd, const std::string& what, int64_t* size) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return CannotStat(errno, what);
  if (auto s = RegularOrError(st, what); !s.ok()) return s;
  if (size != nullptr) *size = static_cast<int64_t>(st.st_size);
  return absl::OkStatus();
}

namespace {

// ScopedConfinedReads' root on this thread, resolved; empty when none.
thread_local std::string confined_root;

// `path` under confined_root opened as ScopedConfinedReads says; -1 with errno set otherwise.
int OpenConfined(const std::string& path, const std::string& what, absl::Status* refused) {
  char resolved[PATH_MAX];
  if (::realpath(path.c_str(), resolved) == nullptr) return -1;
  const std::string file(resolved);
  if (!absl::StartsWith(file, confined_root + "/")) {
    *refused = absl::PermissionDeniedError(
        absl::StrCat(what, " now leads outside ", confined_root,
                     " (a symlink changed since its path was checked); give the path again"));
    return -1;
  }
  const int fd = OpenWithoutSymlinks(file);
  if (fd >= 0) return fd;
  if (errno == ELOOP || errno == EXDEV) {
    *refused = absl::PermissionDeniedError(
        absl::StrCat(what, " changed into a symlink while it was opened; give the path again"));
    return -1;
  }
  if (errno == ENOSYS || errno == EPERM) {  // an old kernel, or a seccomp filter
    return ::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  }
  return -1;
}

}  // namespace

ScopedConfinedReads::ScopedConfinedReads(const std::string& root) : previous_(confined_root) {
  char resolved[PATH_MAX];
  confined_root = ::realpath(root.c_str(), resolved) != nullptr ? resolved : root;
}

ScopedConfinedReads::~ScopedConfinedReads() { confined_root = previous_; }

absl::StatusOr<int> OpenRegularFile(const std::string& path, const std::string& what,
                                    int64_t* size) {
  absl::Status refused;
  const int fd = confined_root.empty() || !absl::StartsWith(path, confined_root + "/")
                     ? ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK)
                     : OpenConfined(path, what, &refused);
  if (!refused.ok()) return refused;
  if (fd < 0) return CannotStat(errno, what);
  if (auto s = RequireRegularDescriptor(fd, what, size); !s.ok()) {
    ::close(fd);
    return s;
  }
  return fd;
}

absl::StatusOr<std::string> ReadRegularFile(const std::string& path, const std::string& what) {
  auto fd = OpenRegularFile(path, what);
  if (!fd.ok()) return fd.status();
  absl::Status status;
  std::string bytes;
  char buffer[1 << 16];
  while (true) {
    const ssize_t n = ::read(*fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) status = CannotStat(errno, what);
    if (n <= 0) break;
    bytes.append(buffer, static_cast<size_t>(n));
  }
  ::close(*fd);
  if (!status.ok()) return status;
  return bytes;
}

}  // namespace lorad::engine
