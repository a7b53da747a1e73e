// Durable files: what lorad writes must survive a crash whole or not at all (DESIGN.md: temp
// file, fsync, rename). These are the one implementation every writer uses (adapters,
// checkpoints, safetensors, reports, job datasets). torch-free: the server uses them too.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lorad::engine {

// fsyncs a file or a folder (a folder's fsync makes the renames inside it durable).
absl::Status SyncPath(const std::string& path);

// The mode of what lorad writes: kSharedFile for what other accounts may read (adapters, merged
// models), kPrivateFile for a job's examples and what quotes them (inline datasets, held-out
// answers), which jobs.db (0600) also keeps from other accounts.
inline constexpr unsigned kSharedFile = 0644;
inline constexpr unsigned kPrivateFile = 0600;

// Writes `bytes` to `path` (replacing it, with `mode` whatever it had) and fsyncs the file; no
// rename.
absl::Status WriteSyncedFile(const std::string& path, const std::string& bytes,
                             unsigned mode = kSharedFile);

// Writes `bytes` to <path>.tmp, fsyncs it, renames it over `path` and fsyncs the folder: a reader
// sees the old file or the new one, never a part.
absl::Status WriteFileAtomically(const std::string& path, const std::string& bytes,
                                 unsigned mode = kSharedFile);

// Puts the finished folder `from` in the place of the folder `to`, which exists, and removes the
// old one: swapped in one step where the filesystem can (RENAME_EXCHANGE), so a kill meanwhile
// leaves the old folder or the new one under the name, never neither; where it cannot (NFS, CIFS,
// many FUSE filesystems), the old one is renamed aside first. `from` is gone on success; on an
// error nothing has changed but `from` may remain (the caller removes it).
absl::Status ReplaceFolder(const std::string& from, const std::string& to);

// Before reading a file a request named: `path` (after symlinks) must be a regular file. A FIFO
// would block the reader until some writer opened it, and a device may never end. NotFound when
// it does not exist, InvalidArgument naming what it is otherwise; `what` starts the message
// ("dataset 'x.jsonl'").
absl::Status RequireRegularFile(const std::string& path, const std::string& what);

// The whole of the file at `path`, checked as RequireRegularFile checks it but on the file
// opened (O_NONBLOCK, then fstat): one swapped for a FIFO between a check and the read does not
// block the reader. The same codes and messages.
absl::StatusOr<std::string> ReadRegularFile(const std::string& path, const std::string& what);

// Whether a write failed for want of storage (a full disk or quota, a read-only or failing
// disk, a folder that cannot be written or is not a folder): what an operator can fix while the
// writer waits, as opposed to an error in what is written. Read from the OS error text lorad's
// writers quote (strerror, std::filesystem) and torch's archive writer's.
bool IsStorageFailure(const absl::Status& status);

// RESOURCE_EXHAUSTED (a storage failure) naming both sizes when the filesystem of `folder` has
// less than `bytes` available to this process; OK where that cannot be read (the writes will
// tell). `what` names what needs the room ("the merged model").
absl::Status RequireRoom(const std::string& folder, uint64_t bytes, const std::string& what);

// `path` opened for reading (O_RDONLY | O_CLOEXEC | O_NONBLOCK: a FIFO in the file's place does
// not hold the open until a writer comes) and the file opened checked to be a regular file
// (fstat), with RequireRegularFile's codes and messages. The caller closes the descriptor.
// *size, when given, is the file's size.
absl::StatusOr<int> OpenRegularFile(const std::string& path, const std::string& what,
                                    int64_t* size = nullptr);

// `path` opened O_RDONLY | O_CLOEXEC | O_NONBLOCK through no symlink (openat2
// RESOLVE_NO_SYMLINKS); -1 with errno otherwise: ELOOP or EXDEV for a symlink on the way, ENOSYS
// or EPERM where the kernel (or a container's seccomp filter) has no openat2.
int OpenWithoutSymlinks(const std::string& path);

// While one lives, OpenRegularFile (and so ReadRegularFile) on this thread opens a file under
// `root` only as the file its path resolves to now, inside `root`, through no symlink: a folder
// or file of a request's path, checked inside its root, then swapped for a symlink to a file
// outside (whose contents an error might quote) is refused, PERMISSION_DENIED, not read. Paths
// outside `root` open as before. Where the kernel lacks openat2, a plain open of the resolved
// path.
class ScopedConfinedReads {
 public:
  explicit ScopedConfinedReads(const std::string& root);
  ~ScopedConfinedReads();
  ScopedConfinedReads(const ScopedConfinedReads&) = delete;
  ScopedConfinedReads& operator=(const ScopedConfinedReads&) = delete;

 private:
  std::string previous_;
};

// OpenRegularFile's check on a descriptor opened otherwise (openat2); closes nothing.
absl::Status RequireRegularDescriptor(int fd, const std::string& what, int64_t* size = nullptr);

}  // namespace lorad::engine
