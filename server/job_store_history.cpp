// JobStore: a job's history, its steps and events (job_steps, job_events), kept so that WatchJob
// replays what a job reported, in order, across restarts.
#include <sqlite3.h>

#include "absl/strings/str_cat.h"
#include "server/job_store.h"
#include "server/sqlite_statement.h"

namespace lorad::server {
namespace {

// A row of "SELECT step, kind, event FROM job_events".
StoredEvent ReadEvent(Statement& s) {
  return {s.Int(0), static_cast<int32_t>(s.Int(1)), s.Blob(2)};
}

constexpr const char* kStepColumns =
    "SELECT step, epoch, loss, learning_rate, grad_norm, tokens_per_second, step_seconds, "
    "elapsed_seconds, eta_seconds, time_ms FROM job_steps WHERE job_id = ? ";

StepRecord ReadStep(Statement& s) {
  StepRecord r;
  r.step = s.Int(0);
  r.epoch = s.Double(1);
  r.loss = s.Double(2);
  r.learning_rate = s.Double(3);
  r.grad_norm = s.Double(4);
  r.tokens_per_second = s.Double(5);
  r.step_seconds = s.Double(6);
  r.elapsed_seconds = s.Double(7);
  r.eta_seconds = s.Double(8);
  r.time_ms = s.Int(9);
  return r;
}

}  // namespace

absl::Status JobStore::ForgetHistoryAfter(const std::string& id, int64_t step) {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto s = Exec("BEGIN IMMEDIATE;"); !s.ok()) return s;
  for (const char* table : {"job_steps", "job_events"}) {
    Statement s(db_, absl::StrCat("DELETE FROM ", table, " WHERE job_id = ? AND step > ?;"));
    s.BindText(1, id).Bind(2, step);
    if (auto st = s.Run(); !st.ok()) {
      Exec("ROLLBACK;").IgnoreError();
      return st;
    }
  }
  if (auto st = Exec("COMMIT;"); !st.ok()) {
    Exec("ROLLBACK;").IgnoreError();
    return st;
  }
  return absl::OkStatus();
}

absl::Status JobStore::AppendStep(const std::string& id, const StepRecord& r) {
  return InsertStep(id, r, "REPLACE").status();
}

absl::StatusOr<bool> JobStore::AppendStepIfMissing(const std::string& id, const StepRecord& r) {
  return InsertStep(id, r, "IGNORE");
}

absl::StatusOr<bool> JobStore::InsertStep(const std::string& id, const StepRecord& r,
                                          const char* conflict) {
  std::lock_guard<std::mutex> lock(mu_);
  // REPLACE: a job resumed from a checkpoint reports the steps after it again. IGNORE: the
  // steps before it it reports again, kept as first recorded.
  Statement s(db_, absl::StrCat("INSERT OR ", conflict,
                                " INTO job_steps (job_id, step, epoch, loss, learning_rate, "
                                "grad_norm, tokens_per_second, step_seconds, elapsed_seconds, "
                                "eta_seconds, time_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?);"));
  s.BindText(1, id).Bind(2, r.step).Bind(3, r.epoch).Bind(4, r.loss).Bind(5, r.learning_rate);
  s.Bind(6, r.grad_norm).Bind(7, r.tokens_per_second).Bind(8, r.step_seconds);
  s.Bind(9, r.elapsed_seconds).Bind(10, r.eta_seconds).Bind(11, r.time_ms);
  if (auto st = s.Run(); !st.ok()) {
    return absl::InternalError(
        absl::StrCat("job '", id, "': cannot record step ", r.step, ": ", st.message()));
  }
  return sqlite3_changes(db_) > 0;
}

absl::StatusOr<std::vector<StepRecord>> JobStore::Steps(const std::string& id, int64_t from_step,
                                                        int64_t limit) {
  std::lock_guard<std::mutex> lock(mu_);
  // LIMIT -1: no limit.
  Statement s(db_, absl::StrCat(kStepColumns, "AND step >= ? ORDER BY step LIMIT ?;"));
  s.BindText(1, id).Bind(2, from_step).Bind(3, limit > 0 ? limit : int64_t{-1});
  std::vector<StepRecord> steps;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) steps.push_back(ReadStep(s));
  if (rc != SQLITE_DONE) return s.StepError();
  return steps;
}

absl::StatusOr<std::optional<StepRecord>> JobStore::LastStep(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, absl::StrCat(kStepColumns, "ORDER BY step DESC LIMIT 1;"));
  s.BindText(1, id);
  const int rc = s.Step();
  if (rc == SQLITE_ROW) return std::optional<StepRecord>(ReadStep(s));
  if (rc != SQLITE_DONE) return s.StepError();
  return std::optional<StepRecord>();
}

absl::StatusOr<bool> JobStore::AppendEvent(const std::string& id, const StoredEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement seen(db_, "SELECT 1 FROM job_events WHERE job_id = ? AND step = ? AND kind = ?;");
  seen.BindText(1, id).Bind(2, event.step).Bind(3, static_cast<int64_t>(event.kind));
  const int rc = seen.Step();
  if (rc != SQLITE_ROW && rc != SQLITE_DONE) return seen.StepError();
  if (auto s = AppendEventLocked(id, event); !s.ok()) return s.status();
  return rc == SQLITE_DONE;
}

absl::StatusOr<bool> JobStore::AppendEventIfMissing(const std::string& id,
                                                    const StoredEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  return AppendEventLocked(id, event, "IGNORE");
}

absl::StatusOr<bool> JobStore::AppendEventLocked(const std::string& id, const StoredEvent& event,
                                                 const char* conflict) {
  Statement s(db_,
              absl::StrCat("INSERT OR ", conflict,
                           " INTO job_events (job_id, step, kind, event) VALUES (?, ?, ?, ?);"));
  s.BindText(1, id).Bind(2, event.step).Bind(3, static_cast<int64_t>(event.kind));
  s.Bind(4, event.event);
  if (auto st = s.Run(); !st.ok()) {
    return absl::InternalError(absl::StrCat("job '", id, "': cannot record an event of step ",
                                            event.step, ": ", st.message()));
  }
  return sqlite3_changes(db_) > 0;
}

absl::StatusOr<std::vector<StoredEvent>> JobStore::Events(const std::string& id, int64_t from_step,
                                                          int64_t through_step) {
  std::lock_guard<std::mutex> lock(mu_);
  // By step, then as a job reports them: evaluation (field 5), a warning (9: a write that failed,
  // or a damaged checkpoint passed over), the checkpoint (6) the warning's retry wrote, and a
  // job's end (finished 7, failed 8) last.
  Statement s(
      db_,
      "SELECT step, kind, event FROM job_events WHERE job_id = ? AND step >= ? AND step <= ? "
      "ORDER BY step, CASE kind WHEN 9 THEN 55 WHEN 7 THEN 100 WHEN 8 THEN 100 ELSE kind * 10 END, "
      "kind;");
  s.BindText(1, id).Bind(2, from_step).Bind(3, through_step);
  std::vector<StoredEvent> events;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) events.push_back(ReadEvent(s));
  if (rc != SQLITE_DONE) return s.StepError();
  return events;
}

absl::StatusOr<std::optional<StoredEvent>> JobStore::LastEvent(const std::string& id,
                                                               int32_t kind) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_,
              "SELECT step, kind, event FROM job_events WHERE job_id = ? AND kind = ? ORDER BY "
              "step DESC LIMIT 1;");
  s.BindText(1, id).Bind(2, static_cast<int64_t>(kind));
  const int rc = s.Step();
  if (rc == SQLITE_ROW) return std::optional<StoredEvent>(ReadEvent(s));
  if (rc == SQLITE_DONE) return std::optional<StoredEvent>();
  return s.StepError();
}

}  // namespace lorad::server
