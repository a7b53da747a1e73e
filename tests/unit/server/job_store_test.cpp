#include "server/job_store.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <thread>

namespace lorad::server {
namespace {

class JobStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ("job_store_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    path_ = (dir_ / "jobs.db").string();
  }
  std::unique_ptr<JobStore> OpenStore() {
    auto store = JobStore::Open(path_);
    EXPECT_TRUE(store.ok()) << store.status();
    return std::move(*store);
  }
  std::filesystem::path dir_;
  std::string path_;
};

TEST_F(JobStoreTest, InsertGetAndSpecRoundTripBinary) {
  auto store = OpenStore();
  const std::string spec = std::string("\x00\x01", 2) + "binary" + "\xff";
  auto job = store->Insert(spec, "my-adapter", 0, 60, 10);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state, JobState::kQueued);
  EXPECT_GT(job->created_ms, 0);
  auto again = store->Get(job->id);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->spec, spec);
  EXPECT_EQ(again->adapter_name, "my-adapter");
  EXPECT_EQ(again->total_steps, 60);
  EXPECT_TRUE(absl::IsNotFound(store->Get("job-nope").status()));
}

// A job's listed spec (the spec without its inline examples) is what List reads: 100 queued
// jobs of 4 MB each made one ListJobs page read 400 MB. Get and the queue read the whole spec; a
// job inserted without one (older lorad) lists its spec; a path rewrite reaches both.
TEST_F(JobStoreTest, ListReadsTheListedSpecAndGetTheWholeOne) {
  auto store = OpenStore();
  const std::string whole = "/old/data/a.jsonl" + std::string(1 << 20, 'x');
  auto big = store->Insert(whole, "big", 0, 1, 10, std::string("/old/data/a.jsonl"));
  ASSERT_TRUE(big.ok()) << big.status();
  auto plain = store->Insert("/old/data/b.jsonl", "plain", 0, 1, 10);
  ASSERT_TRUE(plain.ok()) << plain.status();
  auto page = store->List({}, 10, "");
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->jobs.size(), 2u);
  EXPECT_EQ(page->jobs[1].id, big->id);  // newest first
  EXPECT_EQ(page->jobs[1].spec, "/old/data/a.jsonl");
  EXPECT_EQ(page->jobs[0].spec, "/old/data/b.jsonl");
  EXPECT_EQ(store->Get(big->id)->spec, whole);
  auto next = store->NextQueued();
  ASSERT_TRUE(next.ok() && next->has_value());
  EXPECT_EQ((*next)->spec, whole);

  const JobStore::Rewrite moved = [](const std::string& v) -> std::optional<std::string> {
    if (v.rfind("/old/", 0) != 0) return std::nullopt;
    return "/new/" + v.substr(5);
  };
  const JobStore::Rewrite none = [](const std::string&) { return std::optional<std::string>(); };
  ASSERT_TRUE(store->RewritePaths(moved, none, none).ok());
  page = store->List({}, 10, "");
  ASSERT_TRUE(page.ok());
  EXPECT_EQ(page->jobs[1].spec, "/new/data/a.jsonl");
  EXPECT_EQ(page->jobs[0].spec, "/new/data/b.jsonl");
  EXPECT_EQ(store->Get(big->id)->spec.substr(0, 17), "/new/data/a.jsonl");
}

// Bytes this process has read through read()/pread() (the page cache included), from
// /proc/self/io: what SQLite read from the database file.
int64_t BytesReadSoFar() {
  std::ifstream io("/proc/self/io");
  std::string key;
  int64_t value = 0;
  while (io >> key >> value) {
    if (key == "rchar:") return value;
  }
  ADD_FAILURE() << "no rchar in /proc/self/io";
  return 0;
}

// A page of jobs whose specs hold megabytes of inline examples reads their listed specs, not the
// specs: SQLite reached the columns after a big spec by walking its overflow pages (100 queued
// jobs of 4 MB each read 400 MB a page), and still does for an older row without a listed spec.
TEST_F(JobStoreTest, ListingJobsDoesNotReadTheirBigSpecs) {
  constexpr int kJobs = 8;
  const std::string big(4 << 20, 'x');
  {
    auto store = OpenStore();
    for (int i = 0; i < kJobs; ++i) {
      ASSERT_TRUE(store->Insert(big, "bot", 0, 1, 100, std::string("listed")).ok());
    }
  }
  auto store = OpenStore();  // nothing of theirs cached
  const int64_t before = BytesReadSoFar();
  auto page = store->List({JobState::kQueued}, 50, "");
  const int64_t read = BytesReadSoFar() - before;
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->jobs.size(), static_cast<size_t>(kJobs));
  EXPECT_EQ(page->jobs[0].spec, "listed");
  EXPECT_LT(read, int64_t{1} << 20) << "a page of " << kJobs << " jobs read " << read << " bytes";
}

TEST_F(JobStoreTest, QueueOrderIsPriorityThenSubmission) {
  auto store = OpenStore();
  auto a = store->Insert("a", "a", 0, 1, 10);
  auto b = store->Insert("b", "b", 5, 1, 10);
  auto c = store->Insert("c", "c", 5, 1, 10);
  auto next = store->NextQueued();
  ASSERT_TRUE(next.ok() && next->has_value());
  EXPECT_EQ((*next)->id, b->id);
  ASSERT_TRUE(store->MarkRunning(b->id).ok());
  EXPECT_EQ((*store->NextQueued())->id, c->id);
  ASSERT_TRUE(store->MarkRunning(c->id).ok());
  EXPECT_EQ((*store->NextQueued())->id, a->id);
}

// A stop and start queues the running jobs again; they run first, before the queued jobs of
// higher priority that were waiting behind them (a restart let those jump ahead of a job days
// into its training, which then waited for them all).
TEST_F(JobStoreTest, JobsRunningAtAStopRunFirstAfterTheStart) {
  std::string low, high, other;
  {
    auto store = OpenStore();
    low = store->Insert("l", "low", 0, 1, 10)->id;
    ASSERT_TRUE(store->MarkRunning(low).ok());
    high = store->Insert("h", "high", 5, 1, 10)->id;
    other = store->Insert("o", "other", 9, 1, 10)->id;
    ASSERT_TRUE(store->MarkDaemonRunning("pid 1").ok());
    ASSERT_TRUE(store->MarkDaemonStopped().ok());  // a clean stop
  }
  auto store = OpenStore();
  auto recovered = store->RecoverAfterRestart(3);
  ASSERT_TRUE(recovered.ok());
  EXPECT_EQ(recovered->requeued, std::vector<std::string>{low});
  EXPECT_EQ((*store->NextQueued())->id, low);
  ASSERT_TRUE(store->MarkRunning(low).ok());
  EXPECT_EQ((*store->NextQueued())->id, other);  // then priority order again
  ASSERT_TRUE(store->MarkRunning(other).ok());
  EXPECT_EQ((*store->NextQueued())->id, high);
}

// A job queued again by a restart and cancelled before it ran is, once retried, queued in the
// priority order like any other (it kept its place at the head of the queue).
TEST_F(JobStoreTest, AnInterruptedJobCancelledAndRetriedTakesItsPriorityPlace) {
  std::string low, high;
  {
    auto store = OpenStore();
    low = store->Insert("l", "low", 0, 1, 10)->id;
    ASSERT_TRUE(store->MarkRunning(low).ok());
    ASSERT_TRUE(store->MarkDaemonRunning("pid 1").ok());
    ASSERT_TRUE(store->MarkDaemonStopped().ok());
  }
  auto store = OpenStore();
  ASSERT_TRUE(store->RecoverAfterRestart(3).ok());
  ASSERT_TRUE(store->Cancel(low).ok());
  high = store->Insert("h", "high", 5, 1, 10)->id;
  ASSERT_TRUE(store->Requeue(low, 10).ok());
  EXPECT_EQ((*store->NextQueued())->id, high);
}

TEST_F(JobStoreTest, FullQueueIsResourceExhausted) {
  auto store = OpenStore();
  ASSERT_TRUE(store->Insert("a", "a", 0, 1, 2).ok());
  ASSERT_TRUE(store->Insert("b", "b", 0, 1, 2).ok());
  auto full = store->Insert("c", "c", 0, 1, 2);
  EXPECT_TRUE(absl::IsResourceExhausted(full.status()));
  EXPECT_NE(full.status().message().find("2 queued jobs"), std::string::npos);
}

TEST_F(JobStoreTest, TransitionsAreChecked) {
  auto store = OpenStore();
  auto job = store->Insert("s", "a", 0, 1, 10);
  EXPECT_TRUE(absl::IsFailedPrecondition(
      store->MarkSucceeded(job->id, 1, {1, 7, "early"}, {"a", 1, "/x", "job:x", true, ""})));
  EXPECT_FALSE(store->LastEvent(job->id, 7)->has_value()) << "a refused change stores nothing";
  ASSERT_TRUE(store->MarkRunning(job->id).ok());
  ASSERT_TRUE(
      store->MarkSucceeded(job->id, 3, {1, 7, "summary"}, {"a", 3, "/x", "job:x", true, ""}).ok());
  EXPECT_EQ((*store->LastEvent(job->id, 7))->event, "summary");
  auto recorded = store->Adapters();  // the adapter is recorded with the success, not before
  ASSERT_TRUE(recorded.ok());
  ASSERT_EQ(recorded->size(), 1u);
  EXPECT_EQ((*recorded)[0].version, 3);
  auto done = store->Get(job->id);
  EXPECT_EQ(done->state, JobState::kSucceeded);
  EXPECT_EQ(done->adapter_version, 3);
  EXPECT_GE(done->finished_ms, done->started_ms);
  auto cancelled = store->Cancel(job->id);  // already ended: unchanged
  ASSERT_TRUE(cancelled.ok());
  EXPECT_EQ(cancelled->state, JobState::kSucceeded);
  auto failing = store->Insert("s", "b", 0, 1, 10);
  ASSERT_TRUE(store->MarkFailed(failing->id, "dataset: bad line 3").ok());
  EXPECT_EQ(store->Get(failing->id)->error, "dataset: bad line 3");
}

TEST_F(JobStoreTest, CancelWorksQueuedAndRunning) {
  auto store = OpenStore();
  auto queued = store->Insert("s", "a", 0, 1, 10);
  auto running = store->Insert("s", "b", 0, 1, 10);
  ASSERT_TRUE(store->MarkRunning(running->id).ok());
  EXPECT_EQ(store->Cancel(queued->id)->state, JobState::kCancelled);
  EXPECT_EQ(store->Cancel(running->id)->state, JobState::kCancelled);
  EXPECT_TRUE(absl::IsFailedPrecondition(store->MarkRunning(queued->id)));
}

TEST_F(JobStoreTest, APublishingJobCannotBeCancelledAndACancelledOneCannotPublish) {
  auto store = OpenStore();
  auto publishing = store->Insert("s", "a", 0, 1, 10);
  ASSERT_TRUE(store->MarkRunning(publishing->id).ok());
  ASSERT_TRUE(store->BeginPublishing(publishing->id).ok());
  EXPECT_EQ(store->Cancel(publishing->id)->state, JobState::kRunning) << "too late to cancel";
  ASSERT_TRUE(
      store->MarkSucceeded(publishing->id, 1, {1, 7, "summary"}, {"a", 1, "/x", "job:x", true, ""})
          .ok());

  auto cancelled = store->Insert("s", "b", 0, 1, 10);
  ASSERT_TRUE(store->MarkRunning(cancelled->id).ok());
  EXPECT_EQ(store->Cancel(cancelled->id)->state, JobState::kCancelled);
  EXPECT_TRUE(absl::IsFailedPrecondition(store->BeginPublishing(cancelled->id)));
}

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
      store->MarkSucceeded(job->id, 1, {1, 7, "summary"}, {"a", 1, "/x", "job:x", true, ""}).ok());
  ASSERT_EQ(sqlite3_exec(blocker, "ROLLBACK;", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(blocker);
  EXPECT_EQ(store->Cancel(job->id)->state, JobState::kRunning) << "too late to cancel";
  ASSERT_TRUE(store->BeginPublishing(job->id).ok());  // the runner's retry
  ASSERT_TRUE(
      store->MarkSucceeded(job->id, 1, {1, 7, "summary"}, {"a", 1, "/x", "job:x", true, ""}).ok());
  EXPECT_EQ(store->Get(job->id)->state, JobState::kSucceeded);
}

// A write waiting out the busy timeout behind another connection's lock (a sqlite3 shell, a
// backup tool) held the store, and the metrics' job counts waited for it: every scrape, and a
// /healthz behind it on the HTTP server's one thread, took seconds. The counts answer at once
// with the last ones while the store is taken: here before the blocked write has given up.
TEST_F(JobStoreTest, CountsAnswerWhileAWriteWaitsForTheDatabase) {
  auto opened = JobStore::Open(path_, std::chrono::seconds(30));
  ASSERT_TRUE(opened.ok()) << opened.status();
  std::unique_ptr<JobStore> store = std::move(*opened);
  ASSERT_TRUE(store->Insert("a", "a", 0, 1, 10).ok());
  auto before = store->CountByState();
  ASSERT_TRUE(before.ok()) << before.status();
  sqlite3* blocker = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &blocker), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(blocker, "BEGIN IMMEDIATE;", nullptr, nullptr, nullptr), SQLITE_OK);
  std::atomic<bool> inserted{false};
  std::thread writer([&] {
    EXPECT_TRUE(store->Insert("b", "b", 0, 1, 10).ok());
    inserted = true;
  });
  // The writer takes the store and waits on the lock; the counts answer meanwhile (before, they
  // waited out the writer's 30 s, which then failed).
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto during = store->CountByState();
  ASSERT_TRUE(during.ok()) << during.status();
  EXPECT_EQ(*during, *before);
  EXPECT_FALSE(inserted) << "the write should still be waiting for the lock";
  ASSERT_EQ(sqlite3_exec(blocker, "COMMIT;", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(blocker);
  writer.join();
  auto after = store->CountByState();
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ((*after)[0], std::make_pair(JobState::kQueued, int64_t{2}));
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

// The steps before the checkpoint a resumed job starts from, reported again: added where the
// database lacks them (a process killed before recording them), kept as first recorded where not.
TEST_F(JobStoreTest, StepsReportedAgainAreAddedOnlyWhereMissing) {
  auto store = OpenStore();
  auto job = store->Insert("s", "a", 0, 3, 10);
  StepRecord first;
  first.step = 1;
  first.loss = 2.0;
  first.time_ms = 1000;
  ASSERT_TRUE(store->AppendStep(job->id, first).ok());
  StepRecord again = first;
  again.time_ms = 2000;
  auto added = store->AppendStepIfMissing(job->id, again);
  ASSERT_TRUE(added.ok()) << added.status();
  EXPECT_FALSE(*added);
  StepRecord lost;
  lost.step = 2;
  lost.loss = 1.0;
  added = store->AppendStepIfMissing(job->id, lost);
  ASSERT_TRUE(added.ok()) << added.status();
  EXPECT_TRUE(*added);
  auto steps = store->Steps(job->id, 1);
  ASSERT_TRUE(steps.ok());
  ASSERT_EQ(steps->size(), 2u);
  EXPECT_EQ((*steps)[0].time_ms, 1000);
  EXPECT_DOUBLE_EQ((*steps)[1].loss, 1.0);
  // An evaluation the same way: kept as first recorded (its event carries its time).
  ASSERT_TRUE(store->AppendEvent(job->id, {2, 5, "first"}).ok());
  added = store->AppendEventIfMissing(job->id, {2, 5, "again"});
  ASSERT_TRUE(added.ok()) << added.status();
  EXPECT_FALSE(*added);
  added = store->AppendEventIfMissing(job->id, {1, 5, "lost"});
  ASSERT_TRUE(added.ok() && *added);
  auto events = store->Events(job->id, 0);
  ASSERT_TRUE(events.ok());
  ASSERT_EQ(events->size(), 2u);
  EXPECT_EQ((*events)[0].event, "lost");
  EXPECT_EQ((*events)[1].event, "first");
}

TEST_F(JobStoreTest, StepsAreKeptInOrderAndReplacedOnResume) {
  auto store = OpenStore();
  auto job = store->Insert("s", "a", 0, 3, 10);
  for (int64_t step = 1; step <= 3; ++step) {
    StepRecord r;
    r.step = step;
    r.loss = 4.0 / step;
    ASSERT_TRUE(store->AppendStep(job->id, r).ok());
  }
  StepRecord redo;
  redo.step = 3;
  redo.loss = 1.5;  // the resumed run reports step 3 again
  redo.time_ms = 1764892800123;
  redo.grad_norm = std::numeric_limits<double>::quiet_NaN();  // a diverged step's, kept as NaN
  ASSERT_TRUE(store->AppendStep(job->id, redo).ok());
  ASSERT_TRUE(store->SetTotalSteps(job->id, 7).ok());
  EXPECT_EQ(store->Get(job->id)->total_steps, 7);
  auto steps = store->Steps(job->id, 2);
  ASSERT_TRUE(steps.ok());
  ASSERT_EQ(steps->size(), 2u);
  EXPECT_EQ((*steps)[0].step, 2);
  EXPECT_DOUBLE_EQ((*steps)[1].loss, 1.5);
  EXPECT_EQ((*steps)[1].time_ms, 1764892800123);
  EXPECT_TRUE(std::isnan((*steps)[1].grad_norm));
  // A page, and the latest step alone.
  auto page = store->Steps(job->id, 1, 1);
  ASSERT_TRUE(page.ok());
  ASSERT_EQ(page->size(), 1u);
  EXPECT_EQ((*page)[0].step, 1);
  auto last = store->LastStep(job->id);
  ASSERT_TRUE(last.ok() && last->has_value());
  EXPECT_EQ((*last)->step, 3);
  EXPECT_DOUBLE_EQ((*last)->loss, 1.5);
  auto none = store->LastStep("job-without-steps");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
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

TEST_F(JobStoreTest, EventsAreKeptByStepAndKindAndReplacedOnResume) {
  auto store = OpenStore();
  auto job = store->Insert("s", "a", 0, 4, 10);
  EXPECT_TRUE(*store->AppendEvent(job->id, {4, 6, "checkpoint 4"}));
  EXPECT_TRUE(*store->AppendEvent(job->id, {2, 6, "checkpoint 2"}));
  EXPECT_TRUE(*store->AppendEvent(job->id, {2, 5, "eval 2"}));
  EXPECT_FALSE(*store->AppendEvent(job->id, {4, 6, "checkpoint 4 again"}));  // resumed: known
  auto all = store->Events(job->id, 0);
  ASSERT_TRUE(all.ok());
  std::vector<std::string> texts;
  for (const StoredEvent& e : *all) texts.push_back(e.event);
  EXPECT_EQ(texts, (std::vector<std::string>{"eval 2", "checkpoint 2", "checkpoint 4 again"}));
  EXPECT_EQ(store->Events(job->id, 3)->size(), 1u);
  EXPECT_EQ((*store->LastEvent(job->id, 6))->event, "checkpoint 4 again");
  EXPECT_FALSE(store->LastEvent(job->id, 7)->has_value());
  EXPECT_TRUE(store->Events("job-unknown", 0)->empty());
  // A job's end comes last among its last step's events, after a warning of that step (a field
  // number above it): a replay never shows a warning after "succeeded"; and a warning (a write
  // that failed) before the checkpoint its retry wrote.
  EXPECT_TRUE(*store->AppendEvent(job->id, {4, 7, "finished"}));
  EXPECT_TRUE(*store->AppendEvent(job->id, {4, 9, "warning 4"}));
  texts.clear();
  auto last = store->Events(job->id, 4);
  ASSERT_TRUE(last.ok());
  for (const StoredEvent& e : *last) texts.push_back(e.event);
  EXPECT_EQ(texts, (std::vector<std::string>{"warning 4", "checkpoint 4 again", "finished"}));
}

TEST_F(JobStoreTest, AdaptersKeepTheirNewestVersion) {
  auto store = OpenStore();
  ASSERT_TRUE(store->RecordAdapter({"a", 4, "/v4", "/v4", true, ""}).ok());
  ASSERT_TRUE(
      store->RecordAdapter({"a", 3, "/v3", "/v3", true, ""}).ok());  // a slower load, recorded late
  ASSERT_TRUE(store->RecordAdapter({"b", 1, "/b", "job:x", true, ""}).ok());
  ASSERT_TRUE(store->RecordAdapter({"c", 2, "/c2", "/c2", true, ""}).ok());
  ASSERT_TRUE(store->MarkAdapterUnserved("b", 1).ok());
  // An unload of version 1 after version 2 was recorded (a load racing it) leaves 2 served.
  ASSERT_TRUE(store->MarkAdapterUnserved("c", 1).ok());
  auto all = store->Adapters();
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 3u);
  EXPECT_EQ((*all)[0].version, 4);
  EXPECT_EQ((*all)[0].path, "/v4");
  EXPECT_TRUE((*all)[0].served);
  EXPECT_FALSE((*all)[1].served);
  EXPECT_TRUE((*all)[2].served);
  auto served = store->ServedAdapters();  // through its index: a and c
  ASSERT_TRUE(served.ok() && served->size() == 2u && (*served)[1].name == "c");
  EXPECT_EQ(store->ServedAdapters("c")->at(0).version, 2);
  EXPECT_TRUE(store->ServedAdapters("b")->empty());
}

TEST_F(JobStoreTest, ListPaginatesNewestFirstAndFilters) {
  auto store = OpenStore();
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(store->Insert("s", "a", 0, 1, 10)->id);
  ASSERT_TRUE(store->MarkRunning(ids[1]).ok());
  auto first = store->List({}, 2, "");
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->jobs.size(), 2u);
  EXPECT_EQ(first->jobs[0].id, ids[4]);
  auto second = store->List({}, 2, first->next_page_token);
  EXPECT_EQ(second->jobs[0].id, ids[2]);
  auto third = store->List({}, 2, second->next_page_token);
  EXPECT_EQ(third->jobs.size(), 1u);
  EXPECT_TRUE(third->next_page_token.empty());
  auto running = store->List({JobState::kRunning}, 10, "");
  ASSERT_EQ(running->jobs.size(), 1u);
  EXPECT_EQ(running->jobs[0].id, ids[1]);
  EXPECT_TRUE(absl::IsInvalidArgument(store->List({}, 0, "").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(store->List({}, 5, "garbage").status()));
  // A token pages only the filter it was issued for.
  EXPECT_TRUE(absl::IsInvalidArgument(
      store->List({JobState::kQueued}, 2, first->next_page_token).status()));
  auto queued = store->List({JobState::kQueued}, 2, "");
  ASSERT_TRUE(queued.ok() && !queued->next_page_token.empty());
  EXPECT_TRUE(store->List({JobState::kQueued}, 2, queued->next_page_token).ok());
  EXPECT_TRUE(absl::IsInvalidArgument(store->List({}, 2, queued->next_page_token).status()));
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

// A job that kills the daemon (a CUDA fault, the kernel's out-of-memory killer) was queued again
// and started at every start, killing each one: after three deaths while it ran, in a row without
// it getting further than its furthest step, it fails instead. A clean stop does not count, and a
// job that got further (here `other`, beside it), before a death or a clean stop, starts its
// count again.
TEST_F(JobStoreTest, AJobRunningAtThreeDeathsOfTheDaemonWithoutProgressFails) {
  std::string crasher, other;
  {
    auto store = OpenStore();
    crasher = store->Insert("c", "crasher", 0, 10, 10)->id;
    other = store->Insert("o", "other", 0, 100, 10)->id;
  }
  // One life of a daemon on the database: both jobs run, each records steps 1..its last (a job
  // resumed without a checkpoint records its steps again), and the daemon stops cleanly or dies;
  // returns what the next start recovers.
  const auto life = [this, &crasher, &other](int64_t crasher_last, int64_t other_last, bool clean) {
    {
      auto store = OpenStore();
      EXPECT_TRUE(store->MarkDaemonRunning("pid 7").ok());
      for (const auto& [id, last] : {std::pair{crasher, crasher_last}, {other, other_last}}) {
        EXPECT_TRUE(store->MarkRunning(id).ok());
        for (int64_t n = 1; n <= last; ++n) {
          StepRecord step;
          step.step = n;
          EXPECT_TRUE(store->AppendStep(id, step).ok());
        }
      }
      if (clean) {
        EXPECT_TRUE(store->MarkDaemonStopped().ok());
      }
    }  // closed: what a dead process leaves is what it committed
    auto store = OpenStore();
    auto recovered = store->RecoverAfterRestart(3);
    EXPECT_TRUE(recovered.ok()) << recovered.status();
    return *recovered;
  };
  const auto stops = [this](const std::string& id) { return OpenStore()->Get(id)->unclean_stops; };
  auto recovered = life(5, 10, /*clean=*/false);
  EXPECT_EQ(recovered.requeued, (std::vector<std::string>{crasher, other}));
  EXPECT_EQ(recovered.unclean_stop, "pid 7");
  EXPECT_EQ(stops(crasher), 1);
  EXPECT_EQ(stops(other), 1);
  recovered = life(3, 12, /*clean=*/true);
  EXPECT_EQ(recovered.requeued, (std::vector<std::string>{crasher, other}));
  EXPECT_FALSE(recovered.unclean_stop.has_value());
  EXPECT_EQ(stops(crasher), 1);  // the clean stop did not count
  EXPECT_EQ(stops(other), 0);    // it got further (10 -> 12) before the clean stop
  recovered = life(5, 15, /*clean=*/false);
  EXPECT_EQ(stops(crasher), 2);  // no further than step 5
  EXPECT_EQ(stops(other), 1);    // further than step 10: counted from 1 again
  recovered = life(4, 16, /*clean=*/false);
  EXPECT_EQ(recovered.requeued, std::vector<std::string>{other});
  ASSERT_EQ(recovered.failed.size(), 1u);
  EXPECT_EQ(recovered.failed[0].first, crasher);
  auto store = OpenStore();
  const JobRecord failed = *store->Get(crasher);
  EXPECT_EQ(failed.state, JobState::kFailed);
  EXPECT_EQ(failed.error, recovered.failed[0].second);
  EXPECT_EQ(failed.error, JobStore::UncleanStopsError(3, 5, {other}));
  for (const std::string& words :
       {std::string("3 times while this job was running"), std::string("no further than step 5"),
        other + " ran beside it"}) {
    EXPECT_NE(failed.error.find(words), std::string::npos) << failed.error;
  }
  EXPECT_GT(failed.finished_ms, 0);
  EXPECT_EQ(store->Get(other)->state, JobState::kQueued);
  EXPECT_EQ(store->Get(other)->unclean_stops, 1);
  // The mark is forgotten once recovered: a start that dies before running jobs counts nothing.
  auto again = store->RecoverAfterRestart(3);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->unclean_stop.has_value());
}

// A submission's request_id names the one job it queued, across a reopen, until that job is
// deleted; jobs without one are many.
TEST_F(JobStoreTest, ARequestIdNamesOneJobUntilItIsDeleted) {
  std::string id;
  {
    auto store = OpenStore();
    const JobStore::Submission submission{"req-1", "digest-a"};
    auto job = store->Insert("s", "bot", 0, 1, 10, std::nullopt, submission);
    ASSERT_TRUE(job.ok()) << job.status();
    id = job->id;
    auto again = store->Insert("s", "bot", 0, 1, 10, std::nullopt, submission);
    EXPECT_TRUE(absl::IsAlreadyExists(again.status())) << again.status();
    ASSERT_TRUE(store->Insert("s", "bot", 0, 1, 10).ok());
    ASSERT_TRUE(store->Insert("s", "bot", 0, 1, 10).ok());
  }
  auto store = OpenStore();
  auto found = store->FindSubmission("req-1");
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ((*found)->first.id, id);
  EXPECT_EQ((*found)->second, "digest-a");
  EXPECT_FALSE(store->FindSubmission("req-2")->has_value());
  ASSERT_TRUE(store->Cancel(id).ok());
  ASSERT_TRUE(store->Delete(id).ok());
  EXPECT_FALSE(store->FindSubmission("req-1")->has_value());
  EXPECT_TRUE(
      store->Insert("s", "bot", 0, 1, 10, std::nullopt, JobStore::Submission{"req-1", "b"}).ok());
}

// RetryJob: a failed or cancelled job goes back to the queue, its error, end and count of
// unclean stops cleared; no other state is retried.
TEST_F(JobStoreTest, AFailedOrCancelledJobIsQueuedAgain) {
  auto store = OpenStore();
  const std::string failed = store->Insert("f", "a", 0, 1, 10)->id;
  const std::string cancelled = store->Insert("c", "b", 0, 1, 10)->id;
  const std::string queued = store->Insert("q", "c", 0, 1, 10)->id;
  ASSERT_TRUE(store->MarkRunning(failed).ok());
  ASSERT_TRUE(store->MarkFailed(failed, "boom").ok());
  ASSERT_TRUE(store->Cancel(cancelled).ok());
  for (const std::string& id : {failed, cancelled}) {
    auto again = store->Requeue(id, 10);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->state, JobState::kQueued) << id;
    EXPECT_EQ(again->error, "") << id;
    EXPECT_EQ(again->finished_ms, 0) << id;
  }
  EXPECT_EQ(store->Get(failed)->attempts, 1);  // it resumes: the runner says "started again"
  auto refused = store->Requeue(queued, 10);
  EXPECT_TRUE(absl::IsFailedPrecondition(refused.status())) << refused.status();
  EXPECT_TRUE(absl::IsNotFound(store->Requeue("job-nope", 10).status()));
  auto next = store->NextQueued();
  ASSERT_TRUE(next.ok() && next->has_value());
  EXPECT_EQ((*next)->id, failed);  // in its place in the queue (submission order)
  // A full queue refuses a retry as it refuses a submission.
  ASSERT_TRUE(store->Cancel(failed).ok());
  auto full = store->Requeue(failed, /*max_queued=*/2);
  EXPECT_TRUE(absl::IsResourceExhausted(full.status())) << full.status();
}

// A retried job's crash-loop guard measures progress from where it resumes: one the guard failed
// at step 100, retried without a checkpoint, dies at steps 20, 40 and 60 (further each time) and
// stays queued; dying at the same step three times fails it again.
TEST_F(JobStoreTest, ARetriedJobsDeathsCountFromWhereItResumes) {
  std::string id;
  {
    auto store = OpenStore();
    id = store->Insert("j", "bot", 0, 1000, 10)->id;
  }
  // One life that records steps 1..last (none if 0), then dies; returns the state after.
  const auto die_at = [&](int64_t last) {
    {
      auto store = OpenStore();
      EXPECT_TRUE(store->MarkDaemonRunning("pid 9").ok());
      EXPECT_TRUE(store->MarkRunning(id).ok());
      for (int64_t n = 1; n <= last; ++n) {
        StepRecord step;
        step.step = n;
        EXPECT_TRUE(store->AppendStep(id, step).ok());
      }
    }
    auto store = OpenStore();
    EXPECT_TRUE(store->RecoverAfterRestart(3).ok());
    return store->Get(id)->state;
  };
  EXPECT_EQ(die_at(100), JobState::kQueued);
  EXPECT_EQ(die_at(0), JobState::kQueued);
  EXPECT_EQ(die_at(0), JobState::kFailed);
  {
    auto store = OpenStore();
    ASSERT_TRUE(store->Requeue(id, 10).ok());
    ASSERT_TRUE(store->ForgetHistoryAfter(id, 0).ok());  // no checkpoint: from step 1 again
  }
  for (int64_t last : {20, 40, 60}) {
    EXPECT_EQ(die_at(last), JobState::kQueued) << "died at step " << last;
  }
  EXPECT_EQ(OpenStore()->Get(id)->unclean_stops, 1);
  EXPECT_EQ(die_at(60), JobState::kQueued);
  EXPECT_EQ(die_at(60), JobState::kFailed);
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

// Delete removes an ended job with its steps and events, survives a reopen, and refuses a job
// that has not ended (or is publishing its adapter); other jobs keep theirs.
TEST_F(JobStoreTest, DeleteRemovesOnlyAnEndedJobWithItsHistory) {
  auto store = OpenStore();
  auto ended = store->Insert("a", "a", 0, 2, 10);
  auto kept = store->Insert("b", "b", 0, 2, 10);
  auto queued = store->Insert("c", "c", 0, 2, 10);
  ASSERT_TRUE(ended.ok() && kept.ok() && queued.ok());
  for (const auto* job : {&*ended, &*kept}) {
    ASSERT_TRUE(store->MarkRunning(job->id).ok());
    StepRecord step;
    step.step = 1;
    ASSERT_TRUE(store->AppendStep(job->id, step).ok());
    ASSERT_TRUE(store->AppendEvent(job->id, {1, 6, "checkpoint 1"}).ok());
  }
  EXPECT_TRUE(absl::IsFailedPrecondition(store->Delete(queued->id)));
  EXPECT_TRUE(absl::IsFailedPrecondition(store->Delete(ended->id))) << "running";
  ASSERT_TRUE(store->BeginPublishing(ended->id).ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(store->Delete(ended->id))) << "publishing";
  ASSERT_TRUE(store->MarkFailed(ended->id, "boom").ok());
  ASSERT_TRUE(store->MarkFailed(kept->id, "boom").ok());
  const absl::Status deleted = store->Delete(ended->id);
  ASSERT_TRUE(deleted.ok()) << deleted;
  EXPECT_TRUE(absl::IsNotFound(store->Delete(ended->id)));
  store = OpenStore();
  EXPECT_TRUE(absl::IsNotFound(store->Get(ended->id).status()));
  EXPECT_TRUE(store->Steps(ended->id, 0)->empty());
  EXPECT_TRUE(store->Events(ended->id, 0)->empty());
  auto page = store->List({}, 10, "");
  ASSERT_TRUE(page.ok());
  ASSERT_EQ(page->jobs.size(), 2u);
  EXPECT_EQ(page->jobs[0].id, queued->id);
  EXPECT_EQ(page->jobs[1].id, kept->id);
  EXPECT_EQ(store->Steps(kept->id, 0)->size(), 1u);
  EXPECT_EQ(store->Events(kept->id, 0)->size(), 1u);
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
