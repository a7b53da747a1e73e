#include "server/sqlite_statement.h"

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace lorad::server {
// An error of `db` that names the file and, where there is one, what to do.
absl::Status SqliteError(sqlite3* db) {
  const int code = sqlite3_extended_errcode(db) & 0xff;
  const char* file = sqlite3_db_filename(db, "main");
  const std::string name = absl::StrCat("job database '", file != nullptr ? file : "", "'");
  const char* message = sqlite3_errmsg(db);
  switch (code) {
    case SQLITE_FULL:
      return absl::ResourceExhaustedError(absl::StrCat(
          "the job database's disk is full (", name, ": ", message,
          "); free space in storage.data_dir (old job folders hold checkpoints) and retry"));
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return absl::DataLossError(
          absl::StrCat(name, " is damaged (", message, "); ", kDamagedAdvice));
    // (INTERNAL, as any other: PERMISSION_DENIED would read as the caller's, UNAVAILABLE as the
    // daemon gone.)
    case SQLITE_READONLY:
    case SQLITE_PERM:
    case SQLITE_CANTOPEN:
      // Its -wal and -shm files too: a -shm left read-only by a start that was refused kept
      // refusing after the database itself was made writable.
      return absl::InternalError(absl::StrCat(
          name, " cannot be written (", message,
          "): give the user lorad runs as write access to it, to its -wal and -shm files beside it "
          "and to its folder"));
    case SQLITE_IOERR: {
      // An I/O error may be a full disk (the -shm's pwrite at start) or a file lorad may not
      // write: the system's errno says which, and a failing disk is the rest.
      const int err = sqlite3_system_errno(db);
      if (err == ENOSPC || err == EDQUOT) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "the job database's disk is full (", name, ": ", message, ": ", std::strerror(err),
            "); free space in storage.data_dir (old job folders hold checkpoints) and retry"));
      }
      if (err == EROFS || err == EACCES || err == EPERM) {
        return absl::InternalError(absl::StrCat(
            name, " cannot be written (", message, ": ", std::strerror(err),
            "): give the user lorad runs as write access to it, to its -wal and -shm files "
            "beside it and to its folder"));
      }
      return absl::InternalError(
          absl::StrCat(name, ": the disk failed to read or write it (", message, ")"));
    }
    case SQLITE_BUSY:
      // lorad waits (the busy timeout) for its own writers; past that the lock is another
      // process's (a sqlite3 shell in a transaction, a backup tool). ABORTED: a retry may go
      // through (UNAVAILABLE would read as the daemon unreachable).
      return absl::AbortedError(absl::StrCat(
          name, " is locked by another process (", message,
          "): close what holds it open in a transaction (a sqlite3 shell, a backup tool) and "
          "retry"));
    default:
      return absl::InternalError(absl::StrCat(name, ": sqlite: ", message));
  }
}

}  // namespace lorad::server
