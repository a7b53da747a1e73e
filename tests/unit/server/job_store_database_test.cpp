// JobStore and its database file: another connection holding its write lock (a sqlite3 shell,
// a backup tool), a kill -9 mid-write, damage, an older schema, the space deleted jobs leave, the
// times a reopened store writes.
#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "server/job_store.h"
#include "tests/unit/server/job_store_fixture.h"

namespace lorad::server {
namespace {

// A success the database refuses (another connection holds its write lock past the store's busy
// timeout, as a full disk refuses it) leaves the job publishing: a cancel until the runner
// records it again leaves it running, and the success is then recorded. Before, the refused
// record ended the publishing, the cancel took the job, and its adapter was thrown away.
TEST_F(JobStoreTest, ASuccessTheDatabaseRefusesKeepsTheJobPublishing) {
  auto store = OpenStore();
  auto job = store->Insert("s", "a", 0, 1, 10);
  ASSERT_TRUE(job.ok()) << job.status();
  ASSERT_TRUE(store->MarkRunning(job->id).ok());
  ASSERT_TRUE(store->BeginPublishing(job->id).ok());
  sqlite3* blocker = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &blocker), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(blocker, "BEGIN IMMEDIATE;", nullptr, nullptr, nullptr), SQLITE_OK);
  EXPECT_FALSE(
      store->MarkSucceeded(job->id, 1, {1, 7, "summary"}, {"a", 1, "/x", "job:x", true, "", ""})
          .ok());
  ASSERT_EQ(sqlite3_exec(blocker, "ROLLBACK;", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(blocker);
  EXPECT_EQ(store->Cancel(job->id)->state, JobState::kRunning) << "too late to cancel";
  ASSERT_TRUE(store->BeginPublishing(job->id).ok());  // the runner's retry
  ASSERT_TRUE(
      store->MarkSucceeded(job->id, 1, {1, 7, "summary"}, {"a", 1, "/x", "job:x", true, "", ""})
          .ok());
  EXPECT_EQ(store->Get(job->id)->state, JobState::kSucceeded);
}

// Job "b" inserted through `store` on a thread of its own, behind a second connection that holds
// the database's write lock (a sqlite3 shell's BEGIN IMMEDIATE) until Release(): the insert
// holds the store while it waits (up to its busy timeout).
class InsertBehindALock {
 public:
  InsertBehindALock(const std::string& path, JobStore& store) {
    EXPECT_EQ(sqlite3_open(path.c_str(), &blocker_), SQLITE_OK);
    EXPECT_EQ(sqlite3_exec(blocker_, "BEGIN IMMEDIATE;", nullptr, nullptr, nullptr), SQLITE_OK);
    writer_ = std::thread([this, &store] {
      EXPECT_TRUE(store.Insert("b", "b", 0, 1, 10).ok());
      inserted_ = true;
    });
  }
  ~InsertBehindALock() {
    Release();
    writer_.join();
    sqlite3_close(blocker_);
  }
  void Release() {
    if (!released_.exchange(true)) {
      EXPECT_EQ(sqlite3_exec(blocker_, "COMMIT;", nullptr, nullptr, nullptr), SQLITE_OK);
    }
  }
  bool inserted() const { return inserted_; }

 private:
  sqlite3* blocker_ = nullptr;
  std::thread writer_;
  std::atomic<bool> inserted_{false};
  std::atomic<bool> released_{false};
};

// A write waiting out the busy timeout behind another connection's lock (a sqlite3 shell, a
// backup tool) held the store, and the metrics' job counts waited for it: every scrape, and a
// /healthz behind it on the HTTP server's one thread, took seconds. The counts answer with the
// last ones once the store has been taken a while: here before the blocked write has given up.
TEST_F(JobStoreTest, CountsAnswerWhileAWriteWaitsForTheDatabase) {
  auto opened = JobStore::Open(path_, std::chrono::seconds(30));
  ASSERT_TRUE(opened.ok()) << opened.status();
  std::unique_ptr<JobStore> store = std::move(*opened);
  ASSERT_TRUE(store->Insert("a", "a", 0, 1, 10).ok());
  auto before = store->CountByState();
  ASSERT_TRUE(before.ok()) << before.status();
  {
    InsertBehindALock write(path_, *store);
    // The writer takes the store and waits on the lock; the counts answer meanwhile (before,
    // they waited out the writer's 30 s, which then failed).
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    auto during = store->CountByState();
    ASSERT_TRUE(during.ok()) << during.status();
    EXPECT_EQ(*during, *before);
    EXPECT_FALSE(write.inserted()) << "the write should still be waiting for the lock";
  }
  auto after = store->CountByState();
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ((*after)[0], std::make_pair(JobState::kQueued, int64_t{2}));
}

// A write that holds the store for a moment (a step's row while jobs train) is waited for: the
// counts answered at once then were the last ones, which could be the start's zeros (a scrape
// while two jobs trained read "running 0"). Here the write waits 0.15 s for another
// connection's lock, and the counts taken meanwhile include its job.
TEST_F(JobStoreTest, CountsWaitForAShortWrite) {
  auto opened = JobStore::Open(path_, std::chrono::seconds(30));
  ASSERT_TRUE(opened.ok()) << opened.status();
  std::unique_ptr<JobStore> store = std::move(*opened);
  ASSERT_TRUE(store->CountByState().ok());  // the last counts: none queued
  absl::StatusOr<std::vector<std::pair<JobState, int64_t>>> during;
  {
    InsertBehindALock write(path_, *store);
    std::thread committer([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(150));
      write.Release();
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the writer holds the store
    during = store->CountByState();
    committer.join();
  }
  ASSERT_TRUE(during.ok()) << during.status();
  EXPECT_EQ((*during)[0], std::make_pair(JobState::kQueued, int64_t{1}));
}

// A cancel the database refuses (what a full disk does; here another connection holds its write
// lock past the store's busy timeout) holds anyway: the jobs read, list and count as cancelled,
// neither starts nor publishes nor fails, the queue moves past them, and once writes work again
// RecordCancels stores them as the cancel left them.
TEST_F(JobStoreTest, ACancelTheDatabaseRefusesHoldsUntilItIsRecorded) {
  auto store = OpenStore();
  auto queued = store->Insert("q", "q", 5, 1, 10);
  auto running = store->Insert("r", "r", 0, 1, 10);
  auto next = store->Insert("n", "n", 0, 1, 10);
  ASSERT_TRUE(queued.ok() && running.ok() && next.ok());
  ASSERT_TRUE(store->MarkRunning(running->id).ok());
  sqlite3* blocker = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &blocker), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(blocker, "BEGIN IMMEDIATE;", nullptr, nullptr, nullptr), SQLITE_OK);

  for (const auto& job : {queued, running}) {
    auto cancelled = store->Cancel(job->id);
    ASSERT_TRUE(cancelled.ok()) << cancelled.status();
    EXPECT_EQ(cancelled->state, JobState::kCancelled);
    EXPECT_GT(cancelled->finished_ms, 0);
    EXPECT_EQ(store->Get(job->id)->state, JobState::kCancelled);
  }
  EXPECT_EQ(store->UnrecordedCancels().size(), 2u);
  EXPECT_EQ((*store->NextQueued())->id, next->id) << "a cancelled job is next in the queue";
  EXPECT_TRUE(absl::IsFailedPrecondition(store->MarkRunning(queued->id)));
  EXPECT_TRUE(absl::IsFailedPrecondition(store->BeginPublishing(running->id)));
  EXPECT_TRUE(absl::IsFailedPrecondition(store->MarkFailed(running->id, "late")));
  auto cancelled_page = store->List({JobState::kCancelled}, 10, "");
  ASSERT_TRUE(cancelled_page.ok()) << cancelled_page.status();
  EXPECT_EQ(cancelled_page->jobs.size(), 2u);
  auto live_page = store->List({JobState::kQueued, JobState::kRunning}, 10, "");
  ASSERT_TRUE(live_page.ok()) << live_page.status();
  ASSERT_EQ(live_page->jobs.size(), 1u);
  EXPECT_EQ(live_page->jobs[0].id, next->id);
  auto counts = store->CountByState();
  ASSERT_TRUE(counts.ok()) << counts.status();
  EXPECT_EQ(*counts, (std::vector<std::pair<JobState, int64_t>>{{JobState::kQueued, 1},
                                                                {JobState::kRunning, 0},
                                                                {JobState::kSucceeded, 0},
                                                                {JobState::kFailed, 0},
                                                                {JobState::kCancelled, 2}}));

  ASSERT_EQ(sqlite3_exec(blocker, "ROLLBACK;", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(blocker);
  const int64_t cancelled_at = store->Get(queued->id)->finished_ms;
  ASSERT_TRUE(store->RecordCancels().ok());
  EXPECT_TRUE(store->UnrecordedCancels().empty());
  store.reset();
  auto reopened = OpenStore();  // what the database itself says
  EXPECT_EQ(reopened->Get(queued->id)->state, JobState::kCancelled);
  EXPECT_EQ(reopened->Get(queued->id)->finished_ms, cancelled_at);
  EXPECT_EQ(reopened->Get(running->id)->state, JobState::kCancelled);
  EXPECT_EQ(reopened->Get(next->id)->state, JobState::kQueued);
}

// A database of an older lorad (job_steps without time_ms) gains the column on open; its rows
// read with time 0.
TEST_F(JobStoreTest, OlderDatabasesGainTheStepTimeColumn) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db,
                         "CREATE TABLE job_steps (job_id TEXT NOT NULL, step INTEGER NOT NULL, "
                         "epoch REAL, loss REAL, learning_rate REAL, grad_norm REAL, "
                         "tokens_per_second REAL, step_seconds REAL, elapsed_seconds REAL, "
                         "eta_seconds REAL, PRIMARY KEY (job_id, step)) WITHOUT ROWID;"
                         "INSERT INTO job_steps (job_id, step, loss) VALUES ('job-old', 1, 2.5);"
                         "PRAGMA user_version=1;",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  auto store = OpenStore();
  auto old = store->Steps("job-old", 0);
  ASSERT_TRUE(old.ok()) << old.status();
  ASSERT_EQ(old->size(), 1u);
  EXPECT_DOUBLE_EQ((*old)[0].loss, 2.5);
  EXPECT_EQ((*old)[0].time_ms, 0);
  store.reset();
  EXPECT_TRUE(OpenStore() != nullptr);  // and opens again once it has it
}

// A process killed with SIGKILL in the middle of recording steps: after reopening, every job
// row and every acknowledged step is there, and the running job is queued again to resume.
TEST_F(JobStoreTest, SurvivesKill9AndRequeuesRunningJobs) {
  std::string running_id;
  {
    auto store = OpenStore();
    ASSERT_TRUE(store->Insert("q", "queued", 0, 1, 10).ok());
    running_id = store->Insert("r", "running", 0, 100000, 10)->id;
    ASSERT_TRUE(store->MarkRunning(running_id).ok());
  }
  int pipe_fds[2];
  ASSERT_EQ(pipe(pipe_fds), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto store = JobStore::Open(path_);
    if (!(*store)->MarkDaemonRunning("pid 42, the child").ok()) _exit(2);
    for (int64_t step = 1;; ++step) {
      StepRecord r;
      r.step = step;
      if (!(*store)->AppendStep(running_id, r).ok()) _exit(3);
      if (write(pipe_fds[1], &step, sizeof(step)) != sizeof(step)) _exit(4);
    }
  }
  close(pipe_fds[1]);
  int64_t acknowledged = 0, step = 0;
  while (acknowledged < 50 && read(pipe_fds[0], &step, sizeof(step)) == sizeof(step)) {
    acknowledged = step;
  }
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  close(pipe_fds[0]);

  auto store = OpenStore();
  auto recovered = store->RecoverAfterRestart(3);
  ASSERT_TRUE(recovered.ok());
  EXPECT_EQ(recovered->requeued, std::vector<std::string>{running_id});
  EXPECT_EQ(recovered->unclean_stop, "pid 42, the child");
  EXPECT_EQ(store->Get(running_id)->state, JobState::kQueued);
  EXPECT_EQ(store->Get(running_id)->attempts, 1);
  EXPECT_EQ(store->Get(running_id)->unclean_stops, 1);
  auto steps = store->Steps(running_id, 0);
  ASSERT_TRUE(steps.ok());
  EXPECT_GE(static_cast<int64_t>(steps->size()), acknowledged);
  auto counts = store->CountByState();
  ASSERT_TRUE(counts.ok());
  EXPECT_EQ((*counts)[0], std::make_pair(JobState::kQueued, int64_t{2}));
}

TEST_F(JobStoreTest, UnopenablePathIsAClearError) {
  auto store = JobStore::Open("/nonexistent-dir/jobs.db");
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find("/nonexistent-dir/jobs.db"), std::string::npos);
}

// A page damaged inside the file (a failing disk, a bad copy) passes the opening pragmas and the
// schema, and would show only when a call reads it: the file is checked before the store opens,
// and the error names it and says what to do.
TEST_F(JobStoreTest, ADamagedPageIsFoundWhenTheStoreOpens) {
  {
    auto store = OpenStore();
    for (int i = 0; i < 200; ++i) {
      ASSERT_TRUE(store->Insert(std::string(300, 'x'), "a", 0, 1, 1000).ok());
    }
  }
  const auto size = std::filesystem::file_size(path_);
  ASSERT_GT(size, 8u * 4096u);
  {
    FILE* f = std::fopen(path_.c_str(), "r+b");
    ASSERT_NE(f, nullptr);
    std::fseek(f, 4 * 4096, SEEK_SET);  // a page of the jobs table, past the schema's
    const std::string zeros(4096, '\0');
    std::fwrite(zeros.data(), 1, zeros.size(), f);
    std::fclose(f);
  }
  auto store = JobStore::Open(path_);
  ASSERT_FALSE(store.ok());
  EXPECT_TRUE(absl::IsDataLoss(store.status())) << store.status();
  EXPECT_NE(store.status().message().find(path_), std::string::npos) << store.status();
  EXPECT_NE(store.status().message().find("is damaged"), std::string::npos) << store.status();
  EXPECT_NE(store.status().message().find("and the jobs folder beside it"), std::string::npos)
      << store.status();
  // A backup put in its place with the last run's -wal beside it is replayed over by SQLite.
  EXPECT_NE(store.status().message().find("delete its -wal and -shm files"), std::string::npos)
      << store.status();
}

// Times written after a restart follow those the database holds, also when the wall clock was
// stepped back across it (a job failed at the start finished before it had started). Here the
// last run's times lie 2 s ahead of this clock.
TEST_F(JobStoreTest, TimesAfterAReopenFollowThoseTheDatabaseHolds) {
  const int64_t ahead = JobTimeMs() + 2000;
  {
    auto store = OpenStore();
    auto job = store->Insert("a", "a", 0, 2, 10);
    ASSERT_TRUE(job.ok()) << job.status();
    ASSERT_TRUE(store->MarkRunning(job->id, ahead - 1).ok());
    ASSERT_TRUE(store->MarkFailed(job->id, "boom", ahead).ok());
  }
  auto store = OpenStore();
  EXPECT_GE(JobTimeMs(), ahead);
}

// Deleting a long job's history left its pages free inside jobs.db for good (88 MB of free
// pages after a job of 1M steps) and the WAL at its largest while the daemon ran: a new database
// gives them back at each delete.
TEST_F(JobStoreTest, DeletingAJobGivesItsPagesBack) {
  auto store = OpenStore();
  auto job = store->Insert("a", "a", 0, 2, 10);
  ASSERT_TRUE(job.ok()) << job.status();
  ASSERT_TRUE(store->MarkRunning(job->id).ok());
  for (int64_t i = 1; i <= 600; ++i) {
    StepRecord step;
    step.step = i;
    ASSERT_TRUE(store->AppendStep(job->id, step).ok());
    ASSERT_TRUE(store->AppendEvent(job->id, {i, 6, std::string(100, 'e')}).ok());
  }
  ASSERT_TRUE(store->MarkFailed(job->id, "boom").ok());
  const auto pragma = [&](const char* name) {
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    sqlite3_stmt* statement = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(db, (std::string("PRAGMA ") + name + ";").c_str(), -1, &statement,
                                 nullptr),
              SQLITE_OK);
    EXPECT_EQ(sqlite3_step(statement), SQLITE_ROW);
    const int64_t value = sqlite3_column_int64(statement, 0);
    sqlite3_finalize(statement);
    sqlite3_close(db);
    return value;
  };
  const int64_t pages_before = pragma("page_count");
  ASSERT_TRUE(store->Delete(job->id).ok());
  EXPECT_EQ(pragma("freelist_count"), 0);
  EXPECT_LT(pragma("page_count"), pages_before / 2) << "of " << pages_before;
}

}  // namespace
}  // namespace lorad::server
