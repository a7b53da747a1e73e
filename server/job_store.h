// JobStore: the durable fine-tuning job queue, in SQLite (WAL mode) inside the data folder, and
// the record of the adapters it serves (so a restart serves them again).
//
// Holds every job's spec (the serialized lorad.v1.JobSpec), state, priority, timestamps, error,
// resulting adapter, and every optimizer step's metrics, so a restart after a crash or kill -9
// loses nothing: queued jobs stay queued and RecoverAfterRestart() re-queues a job that was
// running (the trainer resumes it from its last checkpoint).
//
// Thread rules: every method may be called from any thread; one connection behind a mutex
// (writes are small: a row per job event).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

struct sqlite3;

namespace lorad::server {

class Statement;  // sqlite_statement.h

// How to put a backup of the job database in its place: the -wal file a running (or killed)
// lorad left beside it would be replayed over the backup by SQLite, which then either never takes
// or reads as damaged. (sqlite_statement.h's kDamagedAdvice begins with the same words.)
inline constexpr char kRestoreAdvice[] =
    "with lorad stopped, restore it from a backup and delete its -wal and -shm files beside it "
    "(SQLite would replay them over the backup)";

enum class JobState { kQueued = 1, kRunning = 2, kSucceeded = 3, kFailed = 4, kCancelled = 5 };

// The wall clock in Unix milliseconds for job records and events, never less than a value it
// returned before in this process, nor than the job times a JobStore opened holds: a clock
// stepped back (NTP, a VM resumed) while a job runs, or across a restart, made it finish before
// it started. (Step times of a run before a restart are not read for it: a full scan.)
int64_t JobTimeMs();

const char* JobStateName(JobState state);
bool IsTerminal(JobState state);

struct JobRecord {
  std::string id;
  std::string spec;  // serialized lorad.v1.JobSpec
  std::string adapter_name;
  JobState state = JobState::kQueued;
  int32_t priority = 0;
  int64_t created_ms = 0;  // Unix epoch milliseconds; 0 = not yet
  int64_t started_ms = 0;
  int64_t finished_ms = 0;
  std::string error;
  int64_t adapter_version = 0;  // set when the job succeeded and published its adapter
  int64_t total_steps = 0;
  int64_t attempts = 0;  // times the job entered running (a restart resumes it)
  // Deaths of the daemon while the job ran, in a row without the job getting further (a clean
  // stop does not count): RecoverAfterRestart fails a job that keeps killing it.
  int64_t unclean_stops = 0;
};

// One optimizer step's metrics, as the trainer reports them.
struct StepRecord {
  int64_t step = 0;
  double epoch = 0;
  double loss = 0;
  double learning_rate = 0;
  double grad_norm = 0;
  double tokens_per_second = 0;
  double step_seconds = 0;
  double elapsed_seconds = 0;
  double eta_seconds = 0;
  int64_t time_ms = 0;  // when it was reported (0 in rows of older lorad versions)
};

// An event kept beside a job's steps and states: an evaluation, a checkpoint or the final
// summary, as a serialized lorad.v1.JobEvent the store does not read. `kind` (the JobEvent field
// number) orders the events of one step; a resumed job that reports the same (step, kind) again
// replaces the row.
struct StoredEvent {
  int64_t step = 0;
  int32_t kind = 0;
  std::string event;
};

// An adapter name lorad serves (or served), kept so that a restart serves it again: its newest
// version and the folder and source it was read from. `served` turns false when the name is
// unloaded; the row stays, so that its versions keep growing after a restart.
struct ServedAdapter {
  std::string name;
  int64_t version = 0;
  std::string path;    // the PEFT folder
  std::string source;  // as AdapterStore takes it: the folder, or "job:<id>"
  bool served = true;
  // What the folder's files held when it was loaded (engine::FilesFingerprint); "" = not known.
  // A restart serves the version again only from the same contents.
  std::string fingerprint;
  // The base model it was published on (Engine::base_fingerprint): "" = the store's
  // (SetBaseFingerprint) when recorded, and when read, not known (an older lorad's record, or a
  // newer version an older lorad published).
  std::string base_fingerprint;
};

struct JobPage {
  std::vector<JobRecord> jobs;
  std::string next_page_token;  // empty on the last page
};

class JobStore {
 public:
  // Opens (creating if needed) the database file. Errors name the path. A write that finds the
  // database locked by another connection waits up to `busy_timeout`, then fails (tests give 0:
  // a write refused at once, as on a full disk).
  static absl::StatusOr<std::unique_ptr<JobStore>> Open(
      const std::string& path, std::chrono::milliseconds busy_timeout = std::chrono::seconds(5));
  ~JobStore();
  JobStore(const JobStore&) = delete;
  JobStore& operator=(const JobStore&) = delete;

  // A client's id for one submission (SubmitJobRequest.request_id) and a digest of the spec it
  // sent: the same id sent again names the job that submission queued.
  struct Submission {
    std::string request_id;
    std::string digest;
  };
  // Queues a new job. RESOURCE_EXHAUSTED when `max_queued` jobs are already queued;
  // ALREADY_EXISTS when a job holds `submission`'s request_id (FindSubmission says which).
  // `listed_spec`: what List returns as the job's spec, where it is smaller than the spec (the
  // spec without its inline examples: 100 jobs of 4 MB each made one ListJobs page read 400 MB);
  // nullopt: the spec itself.
  absl::StatusOr<JobRecord> Insert(const std::string& spec, const std::string& adapter_name,
                                   int32_t priority, int64_t total_steps, int64_t max_queued,
                                   const std::optional<std::string>& listed_spec = std::nullopt,
                                   const std::optional<Submission>& submission = std::nullopt);
  // The job a submission with this request_id queued, and that submission's digest; nullopt
  // where none did (or its job was deleted).
  absl::StatusOr<std::optional<std::pair<JobRecord, std::string>>> FindSubmission(
      const std::string& request_id);
  absl::StatusOr<JobRecord> Get(const std::string& id);
  // Newest first; `states` empty = all. page_size in [1, 500]. Each job's spec is its listed
  // spec (see Insert).
  absl::StatusOr<JobPage> List(const std::vector<JobState>& states, int32_t page_size,
                               const std::string& page_token);
  // Each queued job's place in the order NextQueued starts them (0: next), by id: jobs a restart
  // interrupted first, then the highest priority, then the oldest; cancels not yet recorded are
  // left out. One pass over the queue.
  absl::StatusOr<std::map<std::string, int64_t>> QueueOrder();
  // The queued job to run next: the highest priority, then oldest, of those RecoverAfterRestart
  // queued again (a stop and start must not let the jobs queued behind a running one go first),
  // else of all. nullopt when none is queued.
  absl::StatusOr<std::optional<JobRecord>> NextQueued();
  // The first `count` queued jobs in that order (NextQueued's first).
  absl::StatusOr<std::vector<JobRecord>> NextQueued(size_t count);

  // State changes. Each checks the job's current state and fails with FAILED_PRECONDITION when
  // the transition is not allowed (e.g. starting a cancelled job). `at_ms` is the time stored
  // (the time of the state event the caller publishes, so a replay shows the same); 0 = now.
  absl::Status MarkRunning(const std::string& id, int64_t at_ms = 0);
  // Also stores `final_event` (the job's summary) and records `adapter` (RecordAdapter) in the
  // same transaction: a job that reads as succeeded always has its summary, and a published
  // adapter is served again after a restart exactly when its job is done (a job killed before
  // this runs its end again and publishes then).
  absl::Status MarkSucceeded(const std::string& id, int64_t adapter_version,
                             const StoredEvent& final_event, const ServedAdapter& adapter,
                             int64_t at_ms = 0);
  absl::Status MarkFailed(const std::string& id, const std::string& error, int64_t at_ms = 0);
  // Cancels a queued or running job; returns the record after the call. Cancelling a job that
  // already ended, or one that is publishing its adapter, changes nothing.
  // When the database refuses the write (a full disk, its lock held too long, a read-only file),
  // the cancel holds anyway, in memory: the job reads as cancelled here (Get, List, CountByState),
  // NextQueued skips it and no other state change takes it, until RecordCancels writes it (a
  // restart before that forgets it: the job is queued again).
  absl::StatusOr<JobRecord> Cancel(const std::string& id);
  // A failed or cancelled job queued again (RetryJob): its error and end time cleared, its count
  // of unclean stops too; FAILED_PRECONDITION from any other state, RESOURCE_EXHAUSTED when
  // `max_queued` jobs are queued already.
  absl::StatusOr<JobRecord> Requeue(const std::string& id, int64_t max_queued);
  // Writes the cancels the database refused; the first error when some still wait.
  absl::Status RecordCancels();
  // The cancels waiting to be recorded: job id -> why the database refused it.
  std::map<std::string, std::string> UnrecordedCancels();
  // A running job whose training ended is about to publish its adapter: from now on it can only
  // succeed or fail (a cancel that comes later leaves it running, and says so). FAILED_PRECONDITION
  // when it is no longer running (cancelled first: nothing may be published).
  absl::Status BeginPublishing(const std::string& id);

  // Removes an ended job (succeeded, failed or cancelled) with its steps and events, in one
  // transaction. NOT_FOUND for an unknown job; FAILED_PRECONDITION, saying to cancel it first, for
  // one that is queued or running (or publishing its adapter).
  absl::Status Delete(const std::string& id);

  absl::Status AppendStep(const std::string& id, const StepRecord& step);
  // The job resumed from `step` (0: from its start): its steps and events after it were a dead
  // process's run, which the resumed one replaces or never reaches (a cancel, a failure), so they
  // go: the job's progress and history are this run's.
  absl::Status ForgetHistoryAfter(const std::string& id, int64_t step);
  // The step where the job has no row of it yet; true when it was added.
  absl::StatusOr<bool> AppendStepIfMissing(const std::string& id, const StepRecord& step);
  // The trainer's count of the job's steps, once it has read the dataset.
  absl::Status SetTotalSteps(const std::string& id, int64_t total_steps);
  // Steps with step >= from_step, in order; at most `limit` of them when limit > 0 (a page: a
  // long job has hundreds of thousands).
  absl::StatusOr<std::vector<StepRecord>> Steps(const std::string& id, int64_t from_step,
                                                int64_t limit = 0);
  // The job's latest step; nullopt before its first.
  absl::StatusOr<std::optional<StepRecord>> LastStep(const std::string& id);

  // Returns whether the job had no event of that (step, kind) yet: a resumed job reports again
  // what its first run may have reported, and a watcher must not get it twice.
  absl::StatusOr<bool> AppendEvent(const std::string& id, const StoredEvent& event);
  // The same where the job has no event of that (step, kind); one there is kept as it is (a
  // replayed report must not restamp it). True when it was added.
  absl::StatusOr<bool> AppendEventIfMissing(const std::string& id, const StoredEvent& event);
  // Events with from_step <= step <= through_step, by step, then kind.
  absl::StatusOr<std::vector<StoredEvent>> Events(const std::string& id, int64_t from_step,
                                                  int64_t through_step = INT64_MAX);
  // The event of `kind` with the highest step; nullopt when there is none.
  absl::StatusOr<std::optional<StoredEvent>> LastEvent(const std::string& id, int32_t kind);

  // The adapters (ServedAdapter), by name: a publish records its version, an unload of the
  // current one marks the name not served, unless a newer version than `version` (the one
  // unloaded) was recorded meanwhile (a load racing the unload: that one serves).
  absl::Status RecordAdapter(const ServedAdapter& adapter);
  absl::Status MarkAdapterUnserved(const std::string& name, int64_t version);
  absl::StatusOr<std::vector<ServedAdapter>> Adapters();  // every name's, served or not
  // The base model this process serves, recorded with every adapter published from now on.
  void SetBaseFingerprint(std::string fingerprint) {
    std::lock_guard<std::mutex> lock(mu_);
    base_fingerprint_ = std::move(fingerprint);
  }
  // Records `fingerprint` as the base of every adapter whose base is not known: recorded by a
  // lorad before bases were kept, or by one that published a newer version without its base
  // (each base is kept with the version it belongs to).
  absl::Status FillUnknownAdapterBases(const std::string& fingerprint);
  // The served ones (of `name` alone when not empty), through an index: the table keeps every
  // name ever published (its versions go on from there), hundreds of thousands where names are
  // made per tenant or per run, and calls that read it whole took 150 ms each.
  absl::StatusOr<std::vector<ServedAdapter>> ServedAdapters(const std::string& name = "");

  // A daemon is about to run jobs (`since`: what its log should say about it, e.g. its pid and
  // start time), and it stopped cleanly: its running jobs were checkpointed.
  absl::Status MarkDaemonRunning(const std::string& since);
  absl::Status MarkDaemonStopped();
  // The same within `budget` (a second stop signal's: the process ends at once either way), for
  // a database another writer holds or that refuses: DEADLINE_EXCEEDED or its error then.
  absl::Status MarkDaemonStoppedWithin(std::chrono::milliseconds budget);
  // After a restart: every running job goes back to queued (to resume from its checkpoint).
  // Where the last daemon marked itself running and never stopped, it died (a crash, an
  // out-of-memory kill, kill -9): its running jobs count that in unclean_stops, from 1 again for
  // one that recorded a step further than at its last counted death (it made progress), and one
  // whose count reaches max_unclean_stops (> 0) fails instead, with UncleanStopsError (a job that
  // crashes the daemon at the same point, or while it ends, would otherwise crash every start
  // after it). Forgets the mark.
  struct Recovered {
    std::vector<std::string> requeued;
    std::vector<std::pair<std::string, std::string>> failed;  // id, error
    std::optional<std::string> unclean_stop;                  // the dead daemon's mark
  };
  absl::StatusOr<Recovered> RecoverAfterRestart(int64_t max_unclean_stops = 0);
  // `others`: the jobs that were running beside it at the last death.
  static std::string UncleanStopsError(int64_t stops, int64_t step,
                                       const std::vector<std::string>& others);

  // Jobs per state, for metrics. While another call holds the store for longer than
  // kCountsWaitForStore (a write waiting out the busy timeout behind a sqlite3 shell's lock, a
  // deletion of a long job's history) it answers the last counts, rather than hold the HTTP
  // server's one thread, and with it /healthz, for seconds; the first call waits.
  static constexpr std::chrono::milliseconds kCountsWaitForStore{250};
  absl::StatusOr<std::vector<std::pair<JobState, int64_t>>> CountByState();

  // Small facts about the data folder kept with the jobs ("data_dir": where it was at the last
  // start); nullopt for a key never set.
  absl::StatusOr<std::optional<std::string>> GetMeta(const std::string& key);
  absl::Status SetMeta(const std::string& key, const std::string& value);
  // In one transaction: every job's spec through `rewrite_spec`, every stored event through
  // `rewrite_event`, and every adapter's folder (and source folder) through `relocate` (each
  // returns the new value, or nullopt to keep it). Returns how many rows changed.
  using Rewrite = std::function<std::optional<std::string>(const std::string&)>;
  absl::StatusOr<int64_t> RewritePaths(const Rewrite& rewrite_spec, const Rewrite& rewrite_event,
                                       const Rewrite& relocate);

 private:
  explicit JobStore(sqlite3* db, std::string path, std::chrono::milliseconds busy_timeout)
      : db_(db), path_(std::move(path)), busy_timeout_(busy_timeout) {}
  absl::Status Exec(const std::string& sql);
  absl::Status Transition(const std::string& id, const std::vector<JobState>& from, JobState to,
                          const std::string& extra_set_sql, const std::string& error,
                          int64_t number, int64_t at_ms = 0);
  absl::Status TransitionLocked(const std::string& id, const std::vector<JobState>& from,
                                JobState to, const std::string& extra_set_sql,
                                const std::string& error, int64_t number, int64_t at_ms = 0);
  // INSERT OR `conflict` (REPLACE, IGNORE) of an event row; true when a row was written.
  absl::StatusOr<bool> AppendEventLocked(const std::string& id, const StoredEvent& event,
                                         const char* conflict = "REPLACE");
  // INSERT OR `conflict` (REPLACE, IGNORE) of a step row; true when a row was written.
  absl::StatusOr<bool> InsertStep(const std::string& id, const StepRecord& step,
                                  const char* conflict);
  absl::Status RecordAdapterLocked(const ServedAdapter& adapter);
  static absl::StatusOr<std::vector<ServedAdapter>> ReadAdapters(Statement& s);
  absl::StatusOr<JobRecord> GetLocked(const std::string& id);
  // RESOURCE_EXHAUSTED when `max_queued` jobs are queued (Insert, Requeue).
  absl::Status CheckQueueRoomLocked(int64_t max_queued);
  // Removes the mark MarkDaemonRunning set.
  absl::Status ForgetDaemonMarkLocked();
  // The record as Cancel left it: cancelled if its cancel waits to be recorded.
  JobRecord WithUnrecordedCancel(JobRecord record) const;

  std::mutex mu_;
  std::set<std::string> publishing_;  // BeginPublishing's jobs, until they succeed or fail
  struct UnrecordedCancel {
    int64_t at_ms;    // when it was cancelled
    std::string why;  // the database's error
  };
  std::map<std::string, UnrecordedCancel> unrecorded_cancels_;  // by job id
  // Jobs RecoverAfterRestart queued again, until they run (NextQueued takes them first).
  std::set<std::string> interrupted_;
  sqlite3* db_;
  std::string path_;
  std::string base_fingerprint_;            // SetBaseFingerprint
  std::chrono::milliseconds busy_timeout_;  // how long a write waits for another writer
  // CountByState's last answer, for a call that finds mu_ taken.
  std::mutex counted_mu_;
  std::optional<std::vector<std::pair<JobState, int64_t>>> last_counts_;
};

}  // namespace lorad::server
