#include "server/job_store.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <random>
#include <thread>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/sqlite_statement.h"
#include "spdlog/spdlog.h"

namespace lorad::server {

namespace {
std::atomic<int64_t> job_time_floor{0};  // JobTimeMs's last answer, or a time the store holds

void RaiseJobTimeFloor(int64_t ms) {
  int64_t seen = job_time_floor.load();
  while (seen < ms && !job_time_floor.compare_exchange_weak(seen, ms)) {
  }
}
}  // namespace

int64_t JobTimeMs() {
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  RaiseJobTimeFloor(now);
  return job_time_floor.load();  // now, or a later time already given or held
}

namespace {

// Tables added since (job_events, adapters) are created by kSchema's IF NOT EXISTS: an older
// database gains them on open, and an older lorad that opens a newer database ignores them.
// Columns added since (job_steps.time_ms) are added on open with a default, for the same reason.
constexpr int kSchemaVersion = 1;

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  seq INTEGER NOT NULL UNIQUE,          -- submission order, for FIFO and pagination
  spec BLOB NOT NULL,                   -- serialized lorad.v1.JobSpec
  adapter_name TEXT NOT NULL,
  state INTEGER NOT NULL,
  priority INTEGER NOT NULL,
  created_ms INTEGER NOT NULL,
  started_ms INTEGER NOT NULL DEFAULT 0,
  finished_ms INTEGER NOT NULL DEFAULT 0,
  error TEXT NOT NULL DEFAULT '',
  adapter_version INTEGER NOT NULL DEFAULT 0,
  total_steps INTEGER NOT NULL DEFAULT 0,
  attempts INTEGER NOT NULL DEFAULT 0);
  -- listed_spec BLOB: what List reads as the spec, where smaller (no inline examples); NULL: the
  -- spec itself. Added after schema version 1 (see Open).
  -- request_id TEXT, request_digest TEXT: the client's id for the submission that queued the job
  -- and a digest of its spec (Insert); NULL: none. Added after schema version 1 (see Open).
  -- unclean_stops INTEGER: deaths of the daemon while the job ran, in a row without the job
  -- getting further than unclean_stop_step INTEGER, the furthest step it reached in any run
  -- (RecoverAfterRestart). Added after schema version 1 (see Open).
CREATE INDEX IF NOT EXISTS jobs_by_queue ON jobs(state, priority DESC, seq);
CREATE TABLE IF NOT EXISTS job_steps (
  job_id TEXT NOT NULL REFERENCES jobs(id),
  step INTEGER NOT NULL,
  epoch REAL, loss REAL, learning_rate REAL, grad_norm REAL, tokens_per_second REAL,
  step_seconds REAL, elapsed_seconds REAL, eta_seconds REAL,
  time_ms INTEGER NOT NULL DEFAULT 0,   -- added after schema version 1 (see Open)
  PRIMARY KEY (job_id, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_events (
  job_id TEXT NOT NULL REFERENCES jobs(id),
  step INTEGER NOT NULL,
  kind INTEGER NOT NULL,                -- the lorad.v1.JobEvent field number
  event BLOB NOT NULL,                  -- serialized lorad.v1.JobEvent
  PRIMARY KEY (job_id, step, kind)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS adapters (
  name TEXT PRIMARY KEY,
  version INTEGER NOT NULL,             -- the newest version published under the name
  path TEXT NOT NULL,                   -- its PEFT folder
  source TEXT NOT NULL,                 -- the folder, or "job:<id>"
  served INTEGER NOT NULL,
  fingerprint TEXT NOT NULL DEFAULT '') WITHOUT ROWID;  -- added after schema version 1
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL) WITHOUT ROWID;     -- added after schema version 1
)sql";

constexpr const char* kJobColumns =
    "id, spec, adapter_name, state, priority, created_ms, started_ms, finished_ms, error, "
    "adapter_version, total_steps, attempts, unclean_stops";
// The same, with the listed spec (JobStore::Insert) in the spec's place.
constexpr const char* kListedJobColumns =
    "id, COALESCE(listed_spec, spec), adapter_name, state, priority, created_ms, started_ms, "
    "finished_ms, error, adapter_version, total_steps, attempts, unclean_stops";

// "job-" + 16 random hex digits: unguessable enough that ids are not enumerable.
std::string NewJobId() {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  char buf[24];
  snprintf(buf, sizeof(buf), "job-%016llx", static_cast<unsigned long long>(rng()));
  return buf;
}

JobRecord ReadJob(Statement& s) {
  JobRecord r;
  r.id = s.Blob(0);
  r.spec = s.Blob(1);
  r.adapter_name = s.Blob(2);
  r.state = static_cast<JobState>(s.Int(3));
  r.priority = static_cast<int32_t>(s.Int(4));
  r.created_ms = s.Int(5);
  r.started_ms = s.Int(6);
  r.finished_ms = s.Int(7);
  r.error = s.Blob(8);
  r.adapter_version = s.Int(9);
  r.total_steps = s.Int(10);
  r.attempts = s.Int(11);
  r.unclean_stops = s.Int(12);
  return r;
}

std::string StateList(const std::vector<JobState>& states) {
  std::vector<int> ints;
  for (JobState s : states) ints.push_back(static_cast<int>(s));
  return absl::StrJoin(ints, ",");
}

}  // namespace

const char* JobStateName(JobState state) {
  switch (state) {
    case JobState::kQueued:
      return "queued";
    case JobState::kRunning:
      return "running";
    case JobState::kSucceeded:
      return "succeeded";
    case JobState::kFailed:
      return "failed";
    case JobState::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

bool IsTerminal(JobState state) {
  return state == JobState::kSucceeded || state == JobState::kFailed ||
         state == JobState::kCancelled;
}

absl::StatusOr<std::unique_ptr<JobStore>> JobStore::Open(const std::string& path,
                                                         std::chrono::milliseconds busy_timeout) {
  // A new database is readable by its owner alone (SQLite's journal files take its mode): it
  // holds every job's spec and inline examples.
  if (const int fd = open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600); fd >= 0) {
    close(fd);
  }
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                      nullptr) != SQLITE_OK) {
    std::string message = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return absl::UnavailableError(absl::StrCat("job database '", path, "': ", message));
  }
  std::unique_ptr<JobStore> store(new JobStore(db, path, busy_timeout));
  sqlite3_busy_timeout(db, static_cast<int>(busy_timeout.count()));
  // A damaged file fails at the pragmas, the schema or the check below; SqliteError names the
  // file and says what to do. A damaged page elsewhere would pass them: the whole file is
  // checked before the daemon serves (a healthy daemon whose calls fail is worse than a refusal).
  // WAL keeps readers off the writer's back; synchronous=FULL fsyncs every commit, so a job
  // event acknowledged is an event kept, even across a power cut. The WAL is cut back to 64 MB
  // after each checkpoint (deleting a long job's history left one of 90 MB for as long as the
  // daemon ran), and a new database gives the pages of deleted jobs back to the disk (Delete's
  // incremental_vacuum; auto_vacuum takes effect only before the first table is made: an older
  // database shrinks by a VACUUM, README).
  for (const char* pragma :
       {"PRAGMA auto_vacuum=INCREMENTAL;", "PRAGMA journal_mode=WAL;", "PRAGMA synchronous=FULL;",
        "PRAGMA foreign_keys=ON;", "PRAGMA journal_size_limit=67108864;"}) {
    if (auto s = store->Exec(pragma); !s.ok()) return s;
  }
  int64_t found = 0;
  {
    // Finished before the writes below: a statement left open holds a read transaction, and
    // SQLite does not wait (the busy timeout) for a lock it would upgrade that to.
    Statement version(db, "PRAGMA user_version;");
    if (auto s = version.status(); !s.ok()) return s;
    if (version.Step() == SQLITE_ROW) found = version.Int(0);
  }
  if (found > kSchemaVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job database '", path, "' has schema version ", found, ", newer than this lorad (",
        kSchemaVersion, "); upgrade lorad or point storage.data_dir elsewhere"));
  }
  if (auto s = store->Exec(kSchema); !s.ok()) return s;
  // Columns added since schema version 1, with their defaults.
  for (const auto& [table, column, definition] :
       {std::tuple{"job_steps", "time_ms", "INTEGER NOT NULL DEFAULT 0"},
        std::tuple{"adapters", "fingerprint", "TEXT NOT NULL DEFAULT ''"},
        std::tuple{"adapters", "base_fingerprint", "TEXT NOT NULL DEFAULT ''"},
        std::tuple{"jobs", "listed_spec", "BLOB"},
        std::tuple{"jobs", "unclean_stops", "INTEGER NOT NULL DEFAULT 0"},
        std::tuple{"jobs", "unclean_stop_step", "INTEGER NOT NULL DEFAULT 0"},
        std::tuple{"jobs", "request_id", "TEXT"}, std::tuple{"jobs", "request_digest", "TEXT"}}) {
    Statement present(db, absl::StrCat("SELECT 1 FROM pragma_table_info('", table,
                                       "') WHERE name = '", column, "';"));
    if (auto s = present.status(); !s.ok()) return s;
    if (present.Step() != SQLITE_ROW) {
      if (auto s = store->Exec(
              absl::StrCat("ALTER TABLE ", table, " ADD COLUMN ", column, " ", definition, ";"));
          !s.ok()) {
        return s;
      }
    }
  }
  // jobs_listing holds every column List reads but the spec: a row's spec (megabytes of inline
  // examples) sits before the later columns, and SQLite walks its overflow pages to reach them
  // (100 queued jobs of 4 MB each: 400 MB read a page). Built once on an older database.
  for (const char* index :
       {"CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_request ON jobs(request_id) WHERE request_id "
        "IS NOT NULL;",
        "CREATE INDEX IF NOT EXISTS jobs_listing ON jobs(seq, state, id, adapter_name, priority, "
        "created_ms, started_ms, finished_ms, error, adapter_version, total_steps, attempts, "
        "unclean_stops, listed_spec);",
        "CREATE INDEX IF NOT EXISTS adapters_served ON adapters(name) WHERE served = 1;"}) {
    if (auto s = store->Exec(index); !s.ok()) return s;
  }
  if (auto s = store->Exec(absl::StrCat("PRAGMA user_version=", kSchemaVersion, ";")); !s.ok()) {
    return s;
  }
  Statement check(db, "PRAGMA quick_check;");
  if (auto s = check.status(); !s.ok()) return s;
  std::vector<std::string> problems;
  int rc = SQLITE_ROW;
  while ((rc = check.Step()) == SQLITE_ROW && problems.size() < 3) {
    if (std::string row = check.Blob(0); row != "ok") {
      std::replace(row.begin(), row.end(), '\n', ' ');  // the error stays one line
      problems.push_back(std::move(row));
    }
  }
  if (rc != SQLITE_ROW && rc != SQLITE_DONE) return check.StepError();
  if (!problems.empty()) {
    return absl::DataLossError(absl::StrCat("job database '", path, "' is damaged (",
                                            absl::StrJoin(problems, "; "), "); ", kDamagedAdvice));
  }
  {
    // Times this process writes follow those of the runs before it, also after the wall clock
    // was stepped back across the restart (a job failed at the start finished before it began).
    Statement latest(db, "SELECT MAX(created_ms), MAX(started_ms), MAX(finished_ms) FROM jobs;");
    if (auto s = latest.status(); !s.ok()) return s;
    if (latest.Step() == SQLITE_ROW) {
      RaiseJobTimeFloor(std::max({latest.Int(0), latest.Int(1), latest.Int(2)}));
    }
  }
  return store;
}

JobStore::~JobStore() { sqlite3_close(db_); }

absl::Status JobStore::Exec(const std::string& sql) {
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, nullptr) != SQLITE_OK) {
    return SqliteError(db_);
  }
  return absl::OkStatus();
}

absl::StatusOr<JobRecord> JobStore::Insert(const std::string& spec, const std::string& adapter_name,
                                           int32_t priority, int64_t total_steps,
                                           int64_t max_queued,
                                           const std::optional<std::string>& listed_spec,
                                           const std::optional<Submission>& submission) {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto s = Exec("BEGIN IMMEDIATE;"); !s.ok()) return s;
  auto rollback = [this](absl::Status s) {
    Exec("ROLLBACK;").IgnoreError();
    return s;
  };
  if (submission) {
    Statement taken(db_, "SELECT id FROM jobs WHERE request_id = ?;");
    taken.BindText(1, submission->request_id);
    const int rc = taken.Step();
    if (rc == SQLITE_ROW) {
      return rollback(absl::AlreadyExistsError(absl::StrCat("request_id '", submission->request_id,
                                                            "' queued job '", taken.Blob(0), "'")));
    }
    if (rc != SQLITE_DONE) return rollback(taken.StepError());
  }
  if (auto s = CheckQueueRoomLocked(max_queued); !s.ok()) return rollback(s);
  const std::string id = NewJobId();
  Statement insert(db_,
                   "INSERT INTO jobs (id, seq, spec, adapter_name, state, priority, created_ms, "
                   "total_steps, listed_spec, request_id, request_digest) VALUES (?, (SELECT "
                   "COALESCE(MAX(seq), 0) + 1 FROM jobs), ?, ?, ?, ?, ?, ?, ?, ?, ?);");
  insert.BindText(1, id).Bind(2, spec).BindText(3, adapter_name);
  insert.Bind(4, static_cast<int64_t>(JobState::kQueued)).Bind(5, static_cast<int64_t>(priority));
  insert.Bind(6, JobTimeMs()).Bind(7, total_steps);
  if (listed_spec) insert.Bind(8, *listed_spec);  // else NULL
  if (submission) insert.BindText(9, submission->request_id).BindText(10, submission->digest);
  if (auto s = insert.Run(); !s.ok()) return rollback(s);
  if (auto s = Exec("COMMIT;"); !s.ok()) return rollback(s);
  return GetLocked(id);
}

absl::StatusOr<std::optional<std::pair<JobRecord, std::string>>> JobStore::FindSubmission(
    const std::string& request_id) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, "SELECT id, request_digest FROM jobs WHERE request_id = ?;");
  s.BindText(1, request_id);
  const int rc = s.Step();
  if (rc == SQLITE_DONE) return std::optional<std::pair<JobRecord, std::string>>();
  if (rc != SQLITE_ROW) return s.StepError();
  const std::string id = s.Blob(0), digest = s.Blob(1);
  auto job = GetLocked(id);
  if (!job.ok()) return job.status();
  return std::optional<std::pair<JobRecord, std::string>>(std::pair(*std::move(job), digest));
}

absl::Status JobStore::CheckQueueRoomLocked(int64_t max_queued) {
  Statement count(db_, "SELECT COUNT(*) FROM jobs WHERE state = ?;");
  count.Bind(1, static_cast<int64_t>(JobState::kQueued));
  if (count.Step() != SQLITE_ROW) return count.StepError();
  if (count.Int(0) < max_queued) return absl::OkStatus();
  return absl::ResourceExhaustedError(
      absl::StrCat("the job queue is full (", max_queued,
                   " queued jobs); wait for jobs to finish or cancel some"));
}

absl::StatusOr<JobRecord> JobStore::GetLocked(const std::string& id) {
  Statement s(db_, absl::StrCat("SELECT ", kJobColumns, " FROM jobs WHERE id = ?;"));
  s.BindText(1, id);
  const int rc = s.Step();
  if (rc == SQLITE_ROW) return WithUnrecordedCancel(ReadJob(s));
  if (rc == SQLITE_DONE) return absl::NotFoundError(absl::StrCat("job '", id, "' does not exist"));
  return s.StepError();
}

JobRecord JobStore::WithUnrecordedCancel(JobRecord record) const {
  if (auto it = unrecorded_cancels_.find(record.id);
      it != unrecorded_cancels_.end() && !IsTerminal(record.state)) {
    record.state = JobState::kCancelled;
    record.finished_ms = it->second.at_ms;
  }
  return record;
}

absl::StatusOr<JobRecord> JobStore::Get(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  return GetLocked(id);
}

absl::StatusOr<JobPage> JobStore::List(const std::vector<JobState>& states, int32_t page_size,
                                       const std::string& page_token) {
  if (page_size < 1 || page_size > 500) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size: ", page_size, " is out of range [1, 500]"));
  }
  // A token is "<seq>.<states>": the page continues below seq, and only for the states filter it
  // was issued for (AIP-158; a bare "<seq>" is an older lorad's token, taken as it is).
  int64_t states_mask = 0;
  for (JobState state : states) states_mask |= int64_t{1} << static_cast<int>(state);
  int64_t before_seq = INT64_MAX;
  if (!page_token.empty()) {
    const size_t dot = page_token.find('.');
    int64_t token_mask = states_mask;
    if (!absl::SimpleAtoi(page_token.substr(0, dot), &before_seq) || before_seq < 1 ||
        (dot != std::string::npos && !absl::SimpleAtoi(page_token.substr(dot + 1), &token_mask))) {
      return absl::InvalidArgumentError(
          "page_token: not a token this server issued; pass next_page_token from the last page");
    }
    if (token_mask != states_mask) {
      return absl::InvalidArgumentError(
          "page_token: was issued for another states filter; keep the filter while paging, or "
          "start again without a page_token");
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  // A cancel waiting to be recorded is stored as queued or running: those rows are read too and
  // the filter applied to what they read as.
  std::vector<JobState> stored_states = states;
  const auto wanted = [&](JobState state) {
    return states.empty() || std::find(states.begin(), states.end(), state) != states.end();
  };
  if (!unrecorded_cancels_.empty() && wanted(JobState::kCancelled)) {
    stored_states.insert(stored_states.end(), {JobState::kQueued, JobState::kRunning});
  }
  // Through jobs_listing: the spec itself is read only where a row has no listed spec (then a
  // small one).
  std::string sql = absl::StrCat("SELECT ", kListedJobColumns,
                                 ", seq FROM jobs INDEXED BY jobs_listing WHERE seq < ?");
  if (!states.empty()) absl::StrAppend(&sql, " AND state IN (", StateList(stored_states), ")");
  absl::StrAppend(&sql, " ORDER BY seq DESC;");
  Statement s(db_, sql);
  if (auto st = s.status(); !st.ok()) return st;
  s.Bind(1, before_seq);
  JobPage page;
  int64_t last_seq = 0;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) {
    JobRecord job = WithUnrecordedCancel(ReadJob(s));
    if (!wanted(job.state)) continue;
    if (static_cast<int32_t>(page.jobs.size()) == page_size) {
      page.next_page_token = absl::StrCat(last_seq, ".", states_mask);
      break;
    }
    page.jobs.push_back(std::move(job));
    last_seq = s.Int(13);
  }
  if (rc != SQLITE_ROW && rc != SQLITE_DONE) return s.StepError();
  return page;
}

absl::StatusOr<std::map<std::string, int64_t>> JobStore::QueueOrder() {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, "SELECT id FROM jobs WHERE state = ? ORDER BY priority DESC, seq;");
  s.Bind(1, static_cast<int64_t>(JobState::kQueued));
  std::vector<std::string> first, then;  // as NextQueued picks them
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) {
    std::string id = s.Blob(0);
    if (unrecorded_cancels_.count(id) > 0) continue;
    (interrupted_.count(id) > 0 ? first : then).push_back(std::move(id));
  }
  if (rc != SQLITE_DONE) return s.StepError();
  std::map<std::string, int64_t> order;
  for (const auto* ids : {&first, &then}) {
    for (const std::string& id : *ids) order.emplace(id, static_cast<int64_t>(order.size()));
  }
  return order;
}

absl::StatusOr<std::optional<JobRecord>> JobStore::NextQueued() {
  auto next = NextQueued(1);
  if (!next.ok()) return next.status();
  if (next->empty()) return std::optional<JobRecord>();
  return std::optional<JobRecord>(std::move(next->front()));
}

absl::StatusOr<std::vector<JobRecord>> JobStore::NextQueued(size_t count) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, absl::StrCat("SELECT ", kJobColumns,
                                " FROM jobs WHERE state = ? ORDER BY priority DESC, seq;"));
  s.Bind(1, static_cast<int64_t>(JobState::kQueued));
  std::vector<JobRecord> first, then;  // as QueueOrder
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) {
    JobRecord job = ReadJob(s);
    if (unrecorded_cancels_.count(job.id) > 0) continue;
    if (interrupted_.count(job.id) > 0) {
      first.push_back(std::move(job));
      if (first.size() >= count) break;
    } else if (then.size() < count) {
      then.push_back(std::move(job));
      if (interrupted_.empty() && then.size() >= count) break;
    }
  }
  if (rc != SQLITE_DONE && rc != SQLITE_ROW) return s.StepError();
  for (JobRecord& job : then) {
    if (first.size() >= count) break;
    first.push_back(std::move(job));
  }
  return first;
}

absl::Status JobStore::Transition(const std::string& id, const std::vector<JobState>& from,
                                  JobState to, const std::string& extra_set_sql,
                                  const std::string& error, int64_t number, int64_t at_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  return TransitionLocked(id, from, to, extra_set_sql, error, number, at_ms);
}

absl::Status JobStore::TransitionLocked(const std::string& id, const std::vector<JobState>& from,
                                        JobState to, const std::string& extra_set_sql,
                                        const std::string& error, int64_t number, int64_t at_ms) {
  auto job = GetLocked(id);
  if (!job.ok()) return job.status();
  if (std::find(from.begin(), from.end(), job->state) == from.end()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job '", id, "' is ", JobStateName(job->state), "; it cannot become ", JobStateName(to)));
  }
  Statement s(db_, absl::StrCat("UPDATE jobs SET state = :state, error = :error, ", extra_set_sql,
                                " WHERE id = :id;"));
  // Never before the job was made or started (a wall clock stepped back across a restart).
  const int64_t now = std::max({at_ms > 0 ? at_ms : JobTimeMs(), job->created_ms, job->started_ms});
  s.BindNamed(":state", static_cast<int64_t>(to)).BindNamed(":now", now);
  s.BindNamed(":number", number);
  s.BindText(s.Index(":error"), error);
  s.BindText(s.Index(":id"), id);
  absl::Status run = s.Run();
  // Out of the queue (run, cancelled, failed): no longer one a restart queued again, also when
  // a retry queues it later.
  if (run.ok()) interrupted_.erase(id);
  return run;
}

absl::Status JobStore::MarkRunning(const std::string& id, int64_t at_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  // started_ms keeps the first start across restarts; attempts counts them.
  return TransitionLocked(id, {JobState::kQueued}, JobState::kRunning,
                          "started_ms = CASE started_ms WHEN 0 THEN :now ELSE started_ms END, "
                          "attempts = attempts + 1",
                          "", 0, at_ms);
}

absl::Status JobStore::MarkSucceeded(const std::string& id, int64_t adapter_version,
                                     const StoredEvent& final_event, const ServedAdapter& adapter,
                                     int64_t at_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  absl::Status s = Exec("BEGIN IMMEDIATE;");
  if (s.ok()) {
    s = TransitionLocked(id, {JobState::kRunning}, JobState::kSucceeded,
                         "finished_ms = :now, adapter_version = :number", "", adapter_version,
                         at_ms);
    if (s.ok()) s = AppendEventLocked(id, final_event).status();
    if (s.ok()) s = RecordAdapterLocked(adapter);
    if (s.ok()) s = Exec("COMMIT;");
    if (!s.ok()) Exec("ROLLBACK;").IgnoreError();
  }
  // A record the database refused (a full disk) keeps the job publishing until the runner's
  // retry: a cancel meanwhile must not take a job whose adapter is about to serve.
  if (s.ok() || absl::IsFailedPrecondition(s) || absl::IsNotFound(s)) publishing_.erase(id);
  return s;
}

absl::Status JobStore::MarkFailed(const std::string& id, const std::string& error, int64_t at_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  publishing_.erase(id);
  return TransitionLocked(id, {JobState::kQueued, JobState::kRunning}, JobState::kFailed,
                          "finished_ms = :now", error, 0, at_ms);
}

absl::StatusOr<JobRecord> JobStore::Cancel(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  if (publishing_.count(id) == 0) {
    const int64_t now = JobTimeMs();
    auto status = TransitionLocked(id, {JobState::kQueued, JobState::kRunning},
                                   JobState::kCancelled, "finished_ms = :now", "", 0, now);
    if (absl::IsNotFound(status)) return status;
    // Refused by the database, not by the job's state: the cancel holds from now on.
    if (!status.ok() && !absl::IsFailedPrecondition(status)) {
      unrecorded_cancels_[id] = {now, std::string(status.message())};
    }
  }
  return GetLocked(id);  // already ended, or publishing: unchanged
}

absl::StatusOr<JobRecord> JobStore::Requeue(const std::string& id, int64_t max_queued) {
  std::lock_guard<std::mutex> lock(mu_);
  auto job = GetLocked(id);
  if (!job.ok()) return job.status();
  if (job->state != JobState::kFailed && job->state != JobState::kCancelled) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job '", id, "' is ", JobStateName(job->state),
        job->state == JobState::kSucceeded
            ? "; only a failed or cancelled job is retried: submit its spec again for a new one"
            : "; only a failed or cancelled job is retried"));
  }
  if (auto st = CheckQueueRoomLocked(max_queued); !st.ok()) return st;
  // A cancel the database never recorded is stored as queued or running: the row is right as
  // it is, and the cancel is forgotten. The crash-loop guard starts again from nothing (its
  // furthest step too: the retried job's progress is measured from where it resumes).
  Statement s(db_,
              "UPDATE jobs SET state = ?, error = '', finished_ms = 0, unclean_stops = 0, "
              "unclean_stop_step = 0 WHERE id = ?;");
  s.Bind(1, static_cast<int64_t>(JobState::kQueued)).BindText(2, id);
  if (auto st = s.Run(); !st.ok()) return st;
  unrecorded_cancels_.erase(id);
  interrupted_.erase(id);  // queued by the retry, in the priority order
  return GetLocked(id);
}

absl::Status JobStore::RecordCancels() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = unrecorded_cancels_.begin(); it != unrecorded_cancels_.end();) {
    // Only a job still queued or running becomes cancelled; one deleted meanwhile has no row.
    Statement s(db_, absl::StrCat("UPDATE jobs SET state = ?, finished_ms = ? WHERE id = ? AND "
                                  "state IN (",
                                  StateList({JobState::kQueued, JobState::kRunning}), ");"));
    s.Bind(1, static_cast<int64_t>(JobState::kCancelled)).Bind(2, it->second.at_ms);
    s.BindText(3, it->first);
    if (auto st = s.Run(); !st.ok()) return st;
    it = unrecorded_cancels_.erase(it);
  }
  return absl::OkStatus();
}

std::map<std::string, std::string> JobStore::UnrecordedCancels() {
  std::lock_guard<std::mutex> lock(mu_);
  std::map<std::string, std::string> why;
  for (const auto& [id, cancel] : unrecorded_cancels_) why[id] = cancel.why;
  return why;
}

absl::Status JobStore::BeginPublishing(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto job = GetLocked(id);
  if (!job.ok()) return job.status();
  if (job->state != JobState::kRunning) {
    return absl::FailedPreconditionError(
        absl::StrCat("job '", id, "' is ", JobStateName(job->state), "; it publishes nothing"));
  }
  publishing_.insert(id);
  return absl::OkStatus();
}

absl::Status JobStore::Delete(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto s = Exec("BEGIN IMMEDIATE;"); !s.ok()) return s;
  auto rollback = [this](absl::Status s) {
    Exec("ROLLBACK;").IgnoreError();
    return s;
  };
  auto job = GetLocked(id);
  if (!job.ok()) return rollback(job.status());
  if (!IsTerminal(job->state) || publishing_.count(id) > 0) {
    return rollback(absl::FailedPreconditionError(
        absl::StrCat("job '", id, "' is ", JobStateName(job->state),
                     "; only an ended job can be deleted: cancel it first (CancelJob)")));
  }
  for (const char* table : {"job_steps", "job_events"}) {
    Statement s(db_, absl::StrCat("DELETE FROM ", table, " WHERE job_id = ?;"));
    s.BindText(1, id);
    if (auto st = s.Run(); !st.ok()) return rollback(st);
  }
  Statement s(db_, "DELETE FROM jobs WHERE id = ?;");
  s.BindText(1, id);
  if (auto st = s.Run(); !st.ok()) return rollback(st);
  if (auto st = Exec("COMMIT;"); !st.ok()) return rollback(st);
  // The deleted rows' pages back to the disk (a no-op on a database made without auto_vacuum).
  // The job is gone whatever this says: a failure only leaves the pages for the next delete.
  if (auto st = Exec("PRAGMA incremental_vacuum;"); !st.ok()) {
    spdlog::warn("job database {}: deleted pages not given back yet: {}", path_,
                 std::string(st.message()));
  }
  unrecorded_cancels_.erase(id);
  return absl::OkStatus();
}

absl::Status JobStore::SetTotalSteps(const std::string& id, int64_t total_steps) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, "UPDATE jobs SET total_steps = ? WHERE id = ?;");
  s.Bind(1, total_steps).BindText(2, id);
  return s.Run();
}

absl::StatusOr<std::vector<std::pair<JobState, int64_t>>> JobStore::CountByState() {
  // A write of a step or a state takes milliseconds: waited for (answering the last counts
  // at once, a scrape while jobs trained read counts from minutes before, or the start's zeros).
  std::unique_lock<std::mutex> lock(mu_, std::defer_lock);
  const auto give_up = std::chrono::steady_clock::now() + kCountsWaitForStore;
  while (!lock.try_lock()) {
    if (std::chrono::steady_clock::now() >= give_up) {
      {
        std::lock_guard<std::mutex> counted(counted_mu_);
        if (last_counts_) return *last_counts_;
      }
      lock.lock();
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::vector<std::pair<JobState, int64_t>> counts;
  for (JobState state : {JobState::kQueued, JobState::kRunning, JobState::kSucceeded,
                         JobState::kFailed, JobState::kCancelled}) {
    Statement s(db_, "SELECT COUNT(*) FROM jobs WHERE state = ?;");
    s.Bind(1, static_cast<int64_t>(state));
    if (s.Step() != SQLITE_ROW) return s.StepError();
    counts.emplace_back(state, s.Int(0));
  }
  // Cancels waiting to be recorded count as cancelled (counts[i] is state i + 1).
  for (const auto& [id, cancel] : unrecorded_cancels_) {
    Statement s(db_, "SELECT state FROM jobs WHERE id = ?;");
    s.BindText(1, id);
    if (s.Step() != SQLITE_ROW) continue;  // deleted
    const auto stored = static_cast<JobState>(s.Int(0));
    if (IsTerminal(stored)) continue;
    --counts[static_cast<int>(stored) - 1].second;
    ++counts[static_cast<int>(JobState::kCancelled) - 1].second;
  }
  std::lock_guard<std::mutex> counted(counted_mu_);
  last_counts_ = counts;
  return counts;
}

absl::StatusOr<std::optional<std::string>> JobStore::GetMeta(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, "SELECT value FROM meta WHERE key = ?;");
  s.BindText(1, key);
  const int rc = s.Step();
  if (rc == SQLITE_ROW) return std::optional<std::string>(s.Blob(0));
  if (rc != SQLITE_DONE) return s.StepError();
  return std::optional<std::string>();
}

absl::Status JobStore::SetMeta(const std::string& key, const std::string& value) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_,
              "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value "
              "= excluded.value;");
  s.BindText(1, key).BindText(2, value);
  return s.Run();
}

absl::StatusOr<int64_t> JobStore::RewritePaths(const Rewrite& rewrite_spec,
                                               const Rewrite& rewrite_event,
                                               const Rewrite& relocate) {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto s = Exec("BEGIN IMMEDIATE;"); !s.ok()) return s;
  auto rollback = [this](absl::Status s) {
    Exec("ROLLBACK;").IgnoreError();
    return s;
  };
  // Each table's rows through its rewrite: (the row's key columns as bound text, new value).
  struct Change {
    std::vector<std::string> keys;
    std::string value;
  };
  int64_t changed = 0;
  const auto rewrite_column = [&](const std::string& select, const std::string& update,
                                  int key_columns, const Rewrite& rewrite) -> absl::Status {
    std::vector<Change> changes;
    Statement rows(db_, select);
    int rc;
    while ((rc = rows.Step()) == SQLITE_ROW) {
      if (auto value = rewrite(rows.Blob(key_columns))) {
        Change c{{}, *std::move(value)};
        for (int k = 0; k < key_columns; ++k) c.keys.push_back(rows.Blob(k));
        changes.push_back(std::move(c));
      }
    }
    if (rc != SQLITE_DONE) return rows.StepError();
    for (const Change& c : changes) {
      Statement write(db_, update);
      write.Bind(1, c.value);
      for (size_t k = 0; k < c.keys.size(); ++k) {
        write.BindText(static_cast<int>(k) + 2, c.keys[k]);
      }
      if (auto s = write.Run(); !s.ok()) return s;
    }
    changed += static_cast<int64_t>(changes.size());
    return absl::OkStatus();
  };
  // An adapter's source is its folder, or "job:<id>" (no path).
  const Rewrite relocate_source = [&relocate](const std::string& source) {
    return absl::StartsWith(source, "job:") ? std::nullopt : relocate(source);
  };
  for (absl::Status s :
       {rewrite_column("SELECT id, spec FROM jobs;", "UPDATE jobs SET spec = ? WHERE id = ?;", 1,
                       rewrite_spec),
        rewrite_column("SELECT id, listed_spec FROM jobs WHERE listed_spec IS NOT NULL;",
                       "UPDATE jobs SET listed_spec = ? WHERE id = ?;", 1, rewrite_spec),
        rewrite_column(
            "SELECT job_id, step, kind, event FROM job_events;",
            "UPDATE job_events SET event = ? WHERE job_id = ? AND step = ? AND kind = ?;", 3,
            rewrite_event),
        rewrite_column("SELECT name, path FROM adapters;",
                       "UPDATE adapters SET path = ? WHERE name = ?;", 1, relocate),
        rewrite_column("SELECT name, source FROM adapters;",
                       "UPDATE adapters SET source = ? WHERE name = ?;", 1, relocate_source)}) {
    if (!s.ok()) return rollback(s);
  }
  if (auto s = Exec("COMMIT;"); !s.ok()) return rollback(s);
  return changed;
}

}  // namespace lorad::server
