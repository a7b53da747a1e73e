#include "server/job_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <string>

#include "tests/unit/server/job_store_fixture.h"

namespace lorad::server {
namespace {

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
  // Job.waiting_for's places follow that order too (they followed the priority alone).
  auto order = store->QueueOrder();
  ASSERT_TRUE(order.ok()) << order.status();
  EXPECT_EQ(*order, (std::map<std::string, int64_t>{{low, 0}, {other, 1}, {high, 2}}));
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
      store->MarkSucceeded(job->id, 1, {1, 7, "early"}, {"a", 1, "/x", "job:x", true, "", ""})));
  EXPECT_FALSE(store->LastEvent(job->id, 7)->has_value()) << "a refused change stores nothing";
  ASSERT_TRUE(store->MarkRunning(job->id).ok());
  ASSERT_TRUE(
      store->MarkSucceeded(job->id, 3, {1, 7, "summary"}, {"a", 3, "/x", "job:x", true, "", ""})
          .ok());
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
  ASSERT_TRUE(store
                  ->MarkSucceeded(publishing->id, 1, {1, 7, "summary"},
                                  {"a", 1, "/x", "job:x", true, "", ""})
                  .ok());

  auto cancelled = store->Insert("s", "b", 0, 1, 10);
  ASSERT_TRUE(store->MarkRunning(cancelled->id).ok());
  EXPECT_EQ(store->Cancel(cancelled->id)->state, JobState::kCancelled);
  EXPECT_TRUE(absl::IsFailedPrecondition(store->BeginPublishing(cancelled->id)));
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
  ASSERT_TRUE(store->RecordAdapter({"a", 4, "/v4", "/v4", true, "", ""}).ok());
  ASSERT_TRUE(store->RecordAdapter({"a", 3, "/v3", "/v3", true, "", ""})
                  .ok());  // a slower load, recorded late
  ASSERT_TRUE(store->RecordAdapter({"b", 1, "/b", "job:x", true, "", ""}).ok());
  ASSERT_TRUE(store->RecordAdapter({"c", 2, "/c2", "/c2", true, "", ""}).ok());
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

}  // namespace
}  // namespace lorad::server
