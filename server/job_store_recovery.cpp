// JobStore: what a start finds of the last process: the jobs it was running, queued again, and
// the mark a daemon keeps while it runs jobs, by which a start tells a death from a clean stop
// (and fails a job that keeps killing the daemon).
#include <sqlite3.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/job_store.h"
#include "server/sqlite_statement.h"

namespace lorad::server {
namespace {

// The meta key a daemon sets before it runs jobs and removes when it stops cleanly: found at the
// next start, that daemon died (RecoverAfterRestart).
constexpr const char* kDaemonRunningKey = "daemon_running";

}  // namespace

absl::Status JobStore::MarkDaemonRunning(const std::string& since) {
  return SetMeta(kDaemonRunningKey, since);
}

absl::Status JobStore::MarkDaemonStopped() {
  std::lock_guard<std::mutex> lock(mu_);
  return ForgetDaemonMarkLocked();
}

absl::Status JobStore::MarkDaemonStoppedWithin(std::chrono::milliseconds budget) {
  const auto deadline = std::chrono::steady_clock::now() + budget;
  std::unique_lock<std::mutex> lock(mu_, std::defer_lock);
  while (!lock.try_lock()) {  // a step's write under way: it ends in milliseconds, or not soon
    if (std::chrono::steady_clock::now() >= deadline) {
      return absl::DeadlineExceededError("the job database was busy");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  sqlite3_busy_timeout(db_, static_cast<int>(std::max<int64_t>(1, left.count())));
  absl::Status s = ForgetDaemonMarkLocked();
  sqlite3_busy_timeout(db_, static_cast<int>(busy_timeout_.count()));
  return s;
}

absl::Status JobStore::ForgetDaemonMarkLocked() {
  Statement s(db_, "DELETE FROM meta WHERE key = ?;");
  s.BindText(1, kDaemonRunningKey);
  return s.Run();
}

absl::StatusOr<JobStore::Recovered> JobStore::RecoverAfterRestart(int64_t max_unclean_stops) {
  std::lock_guard<std::mutex> lock(mu_);
  Recovered recovered;
  {
    Statement marker(db_, "SELECT value FROM meta WHERE key = ?;");
    marker.BindText(1, kDaemonRunningKey);
    const int rc = marker.Step();
    if (rc == SQLITE_ROW) recovered.unclean_stop = marker.Blob(0);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) return marker.StepError();
  }
  struct Running {
    std::string id;
    int64_t stops;  // unclean stops, counting this one where it counts
    int64_t step;   // the furthest step the job has reached in any run
  };
  std::vector<Running> running;
  {
    Statement select(db_,
                     "SELECT id, unclean_stops, unclean_stop_step, (SELECT COALESCE(MAX(step), 0) "
                     "FROM job_steps WHERE job_id = jobs.id) FROM jobs WHERE state = ? ORDER BY "
                     "seq;");
    select.Bind(1, static_cast<int64_t>(JobState::kRunning));
    int rc;
    while ((rc = select.Step()) == SQLITE_ROW) {
      // Its steps are this run's (a resumed run forgets the dead one's after its resume point).
      const int64_t furthest_before = select.Int(2), now = select.Int(3);
      Running r{select.Blob(0), select.Int(1), std::max(furthest_before, now)};
      // A job that got further than ever before made progress: its deaths before were not its
      // doing (or not only), and the count starts again (a clean stop's start too).
      if (now > furthest_before) r.stops = 0;
      if (recovered.unclean_stop) ++r.stops;
      running.push_back(std::move(r));
    }
    if (rc != SQLITE_DONE) return select.StepError();
  }
  absl::Status s = Exec("BEGIN IMMEDIATE;");
  for (size_t i = 0; s.ok() && i < running.size(); ++i) {
    const Running& job = running[i];
    const bool give_up =
        recovered.unclean_stop && max_unclean_stops > 0 && job.stops >= max_unclean_stops;
    std::vector<std::string> others;
    for (const Running& other : running) {
      if (other.id != job.id) others.push_back(other.id);
    }
    const std::string error = give_up ? UncleanStopsError(job.stops, job.step, others) : "";
    Statement update(db_,
                     "UPDATE jobs SET state = ?, unclean_stops = ?, unclean_stop_step = ?, "
                     "error = ?, finished_ms = ? WHERE id = ?;");
    update.Bind(1, static_cast<int64_t>(give_up ? JobState::kFailed : JobState::kQueued));
    update.Bind(2, job.stops).Bind(3, job.step).BindText(4, error);
    update.Bind(5, give_up ? JobTimeMs() : int64_t{0}).BindText(6, job.id);
    s = update.Run();
    if (give_up) {
      recovered.failed.emplace_back(job.id, error);
    } else {
      recovered.requeued.push_back(job.id);
    }
  }
  if (s.ok()) s = ForgetDaemonMarkLocked();
  if (s.ok()) s = Exec("COMMIT;");
  if (!s.ok()) {
    Exec("ROLLBACK;").IgnoreError();
    return s;
  }
  interrupted_.insert(recovered.requeued.begin(), recovered.requeued.end());
  return recovered;
}

std::string JobStore::UncleanStopsError(int64_t stops, int64_t step,
                                        const std::vector<std::string>& others) {
  std::string error = absl::StrCat(
      "lorad stopped without shutting down (a crash, an out-of-memory kill, kill -9 or a power "
      "cut) ",
      stops, " times while this job was running, and it got no further than step ", step,
      " in between, so it was not started again: the job may be what stops lorad");
  if (!others.empty()) {
    absl::StrAppend(&error, " (", absl::StrJoin(others, ", "), " ran beside it at the last stop)");
  }
  absl::StrAppend(&error,
                  ". Look at lorad's log before those stops (and the system's, for an "
                  "out-of-memory kill); once the cause is fixed, RetryJob (loradctl train retry) "
                  "resumes the job from its last checkpoint");
  return error;
}

}  // namespace lorad::server
