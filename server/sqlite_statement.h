// Statement: a prepared SQLite statement for the job store (JobStore), finalized when it goes out
// of scope, whose errors (SqliteError) name the database file and what to do.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <limits>
#include <string>

#include "absl/status/status.h"

namespace lorad::server {

// What a user does about a damaged job database (JobStore::Open's check, or a page that shows its
// damage only when read): restore it (kRestoreAdvice, job_store.h), or start again.
inline constexpr char kDamagedAdvice[] =
    "with lorad stopped, restore it from a backup and delete its -wal and -shm files beside it "
    "(SQLite would replay them over the backup), or move it, and the jobs folder beside it, aside "
    "to start with an empty job queue (adapter versions then start from 1)";

// An error of `db` that names the file and, where there is one, what to do: a full disk is
// RESOURCE_EXHAUSTED, a damaged file DATA_LOSS, anything else INTERNAL.
absl::Status SqliteError(sqlite3* db);

// A prepared statement, finalized when it goes out of scope.
class Statement {
 public:
  Statement(sqlite3* db, const std::string& sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt_, nullptr);
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  // Whether the statement compiled.
  absl::Status status() const { return rc_ == SQLITE_OK ? absl::OkStatus() : SqliteError(db_); }
  // Why the last Step() did not give what the caller needed: the error it (or the compile) met,
  // or, when it simply found no row, that. Never OK.
  absl::Status StepError() const {
    if (rc_ != SQLITE_OK || (step_rc_ != SQLITE_ROW && step_rc_ != SQLITE_DONE)) {
      return SqliteError(db_);
    }
    return absl::InternalError("sqlite: the query returned no row");
  }
  Statement& Bind(int i, const std::string& v) {
    sqlite3_bind_blob(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  int Index(const char* name) { return sqlite3_bind_parameter_index(stmt_, name); }
  Statement& BindText(int i, const std::string& v) {
    sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Statement& Bind(int i, int64_t v) {
    sqlite3_bind_int64(stmt_, i, v);
    return *this;
  }
  // Binds a named parameter (":now") when the statement has it.
  Statement& BindNamed(const char* name, int64_t v) {
    const int i = sqlite3_bind_parameter_index(stmt_, name);
    if (i > 0) sqlite3_bind_int64(stmt_, i, v);
    return *this;
  }
  Statement& Bind(int i, double v) {
    sqlite3_bind_double(stmt_, i, v);
    return *this;
  }
  // SQLITE_ROW, SQLITE_DONE, or an error code.
  int Step() { return step_rc_ = sqlite3_step(stmt_); }
  absl::Status Run() {
    const int rc = Step();
    if (rc == SQLITE_DONE || rc == SQLITE_ROW) return absl::OkStatus();
    return SqliteError(db_);
  }
  int64_t Int(int col) { return sqlite3_column_int64(stmt_, col); }
  // SQLite stores a NaN as NULL: it reads back as NaN (a diverged step's loss or norm), not 0.
  double Double(int col) {
    return sqlite3_column_type(stmt_, col) == SQLITE_NULL ? std::numeric_limits<double>::quiet_NaN()
                                                          : sqlite3_column_double(stmt_, col);
  }
  std::string Blob(int col) {
    const void* p = sqlite3_column_blob(stmt_, col);
    return p ? std::string(static_cast<const char*>(p), sqlite3_column_bytes(stmt_, col)) : "";
  }

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
  int step_rc_ = SQLITE_OK;
};

}  // namespace lorad::server
