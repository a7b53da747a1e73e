// WatchJob over real gRPC (TrainingService in process, a JobStore and a JobEventHub), with the job
// runner's writes done as JobRunner does them: stored first, then published.
#include "server/training_service.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "lorad/v1/training.grpc.pb.h"
#include "server/blocking_calls.h"
#include "server/job_event_hub.h"
#include "server/job_store.h"

namespace lorad::server {
namespace {

namespace fs = std::filesystem;
using lorad::v1::JobEvent;

class Rig {
 public:
  explicit Rig(const std::string& name, TrainingServiceOptions options = {}) {
    dir_ = fs::path(::testing::TempDir()) / ("training_service_test-" + name);
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    auto store = JobStore::Open(db_path());
    EXPECT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
    service_ = std::make_unique<TrainingService>(*store_, hub_, std::move(options));
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    // A slow link: a small receive window that does not grow, so a long history is still being
    // sent while the job goes on.
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16384);
    stub_ = lorad::v1::TrainingService::NewStub(grpc::CreateCustomChannel(
        "127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials(), args));
  }
  ~Rig() { server_->Shutdown(std::chrono::system_clock::now()); }

  std::string db_path() const { return (dir_ / "jobs.db").string(); }
  JobStore& store() { return *store_; }
  JobEventHub& hub() { return hub_; }
  lorad::v1::TrainingService::Stub& stub() { return *stub_; }

  std::string RunningJob() {
    auto job = store_->Insert("", "bot", 0, 0, 64);
    EXPECT_TRUE(job.ok()) << job.status();
    EXPECT_TRUE(store_->MarkRunning(job->id, 1700000000000).ok());
    return job->id;
  }

  // Steps 1..n written straight into the database in one transaction (as many as a long job has).
  void BulkSteps(const std::string& id, int64_t n) {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(db_path().c_str(), &db), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    std::string sql = "BEGIN;";
    for (int64_t s = 1; s <= n; ++s) {
      sql +=
          "INSERT INTO job_steps (job_id, step, epoch, loss, learning_rate, grad_norm, "
          "tokens_per_second, step_seconds, elapsed_seconds, eta_seconds, time_ms) VALUES ('" +
          id + "', " + std::to_string(s) + ", 0, 0.5, 0.0002, 1, 100, 0.1, 1, 0, " +
          std::to_string(1700000000000 + s) + ");";
    }
    sql += "COMMIT;";
    ASSERT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr), SQLITE_OK);
    sqlite3_close(db);
  }

  // A running job with steps 1..n in its history (BulkSteps).
  std::string JobWithHistory(int64_t n) {
    const std::string id = RunningJob();
    BulkSteps(id, n);
    return id;
  }

  // JobRunner::Handle for a step (stored, then published; a step the store refuses is published
  // only, and recorded later), and PublishKept for an evaluation.
  void Step(const std::string& id, int64_t n) {
    RecordStep(id, n);
    PublishStep(id, n);
  }
  void RecordStep(const std::string& id, int64_t n) {
    ASSERT_TRUE(store_->AppendStep(id, StepAt(n)).ok());
  }
  void PublishStep(const std::string& id, int64_t n) {
    JobEvent e;
    e.set_job_id(id);
    *e.mutable_step() = ToProtoStep(StepAt(n), /*total_steps=*/0);
    hub_.Publish(e);
  }
  void Eval(const std::string& id, int64_t n) {
    JobEvent e;
    e.set_job_id(id);
    e.mutable_eval()->set_step(n);
    e.mutable_eval()->set_validation_loss(2.0 / static_cast<double>(n));
    auto added =
        store_->AppendEvent(id, {n, static_cast<int32_t>(e.event_case()), e.SerializeAsString()});
    ASSERT_TRUE(added.ok()) << added.status();
    if (*added) hub_.Publish(e);
  }
  void Fail(const std::string& id) {
    ASSERT_TRUE(store_->MarkFailed(id, "boom", 1800000000000).ok());
    JobEvent failed;
    failed.set_job_id(id);
    failed.set_failed("boom");
    hub_.Publish(failed);
    hub_.Publish(StateEvent(id, JobState::kFailed, 1800000000000));
  }

 private:
  static StepRecord StepAt(int64_t n) {
    StepRecord s;
    s.step = n;
    s.loss = 1.0 / static_cast<double>(n);
    s.time_ms = 1700000000000 + n;
    return s;
  }

  fs::path dir_;
  std::unique_ptr<JobStore> store_;
  JobEventHub hub_;
  std::unique_ptr<TrainingService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<lorad::v1::TrainingService::Stub> stub_;
};

// Steps in a long job's history: many pages for a replay.
constexpr int64_t kLongHistory = 100000;

std::string Describe(const JobEvent& e) {
  if (e.has_step()) return "step " + std::to_string(e.step().step());
  if (e.has_eval()) return "eval " + std::to_string(e.eval().step());
  if (e.has_state()) return lorad::v1::JobState_Name(e.state());
  if (e.has_failed()) return "failed";
  return "other";
}

// A watch of `id` whose first event has been read (the stream is open; the rest waits on the
// client, which reads nothing more until Rest()).
class Watch {
 public:
  Watch(Rig& rig, const std::string& id, int64_t from_step) {
    context_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    lorad::v1::WatchJobRequest request;
    request.set_job_id(id);
    request.set_from_step(from_step);
    reader_ = rig.stub().WatchJob(&context_, request);
    events_.emplace_back();
    EXPECT_TRUE(reader_->Read(&events_.back()));
  }
  std::vector<JobEvent> Rest() {
    const grpc::Status status = RestAndStatus();
    EXPECT_TRUE(status.ok()) << status.error_message();
    return events_;
  }
  // The rest of the events (events()), and how the stream ended.
  grpc::Status RestAndStatus() {
    JobEvent e;
    while (reader_->Read(&e)) events_.push_back(e);
    return reader_->Finish();
  }
  const std::vector<JobEvent>& events() const { return events_; }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReader<JobEvent>> reader_;
  std::vector<JobEvent> events_;
};

// While a long history (many pages of steps) is still being sent, the job goes on: its new
// evaluations come right after their own steps, as a replay of the finished job gives them, not
// after the last page.
TEST(TrainingServiceTest, EvaluationsDuringALongReplayFollowTheirSteps) {
  Rig rig("long-replay");
  const std::string id = rig.JobWithHistory(kLongHistory);
  Watch watch(rig, id, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (int64_t n = kLongHistory + 1; n <= kLongHistory + 3; ++n) {
    rig.Step(id, n);
    rig.Eval(id, n);
  }
  rig.Fail(id);
  const std::vector<JobEvent> events = watch.Rest();
  int64_t steps = 0, evals = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    if (events[i].has_step()) {
      ++steps;
      EXPECT_EQ(events[i].step().step(), steps) << "steps in order, each once";
    }
    if (events[i].has_eval()) {
      ++evals;
      ASSERT_GT(i, 0u);
      EXPECT_TRUE(events[i - 1].has_step() &&
                  events[i - 1].step().step() == events[i].eval().step())
          << "eval " << events[i].eval().step() << " follows " << Describe(events[i - 1]);
    }
  }
  EXPECT_EQ(steps, kLongHistory + 3);
  EXPECT_EQ(evals, 3);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(Describe(events[events.size() - 2]), "failed");
  EXPECT_EQ(Describe(events.back()), "JOB_STATE_FAILED");
}

// Stored evaluations are read a page of steps at a time with the steps: each, at a page's edges
// too, comes once, right after its own step, whatever from_step is; one stored and published
// while the replay is under way, before its page is read, comes once as well.
TEST(TrainingServiceTest, StoredEvaluationsOfALongHistoryFollowTheirStepsPageAfterPage) {
  Rig rig("paged-evals");
  const std::string id = rig.JobWithHistory(kLongHistory);
  std::set<int64_t> evaluated = {1, 999, 1000, 1001, 2000, 2001, kLongHistory};
  for (int64_t n = 997; n < kLongHistory; n += 997) evaluated.insert(n);
  for (int64_t n : evaluated) rig.Eval(id, n);
  for (int64_t from_step : {int64_t{0}, int64_t{1500}}) {
    Watch watch(rig, id, from_step);
    if (from_step == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      rig.Eval(id, kLongHistory / 2);  // stored and published: the page holding it is unread
      evaluated.insert(kLongHistory / 2);
      rig.Fail(id);
    }
    const std::vector<JobEvent> events = watch.Rest();
    std::vector<int64_t> evals;
    for (size_t i = 0; i < events.size(); ++i) {
      if (!events[i].has_eval()) continue;
      evals.push_back(events[i].eval().step());
      ASSERT_GT(i, 0u);
      EXPECT_TRUE(events[i - 1].has_step() &&
                  events[i - 1].step().step() == events[i].eval().step())
          << "eval " << events[i].eval().step() << " follows " << Describe(events[i - 1]);
    }
    std::vector<int64_t> expected;
    for (int64_t n : evaluated) {
      if (n >= from_step) expected.push_back(n);
    }
    EXPECT_EQ(evals, expected) << "from_step " << from_step;
    EXPECT_EQ(Describe(events.back()), "JOB_STATE_FAILED");
  }
}

// Steps the job database refused while a long history was replayed (a full disk: JobRunner
// publishes them and records them once it can) reach the watcher once each, in order, after the
// history's steps; so do those recorded before the replay reaches them.
TEST(TrainingServiceTest, StepsPublishedBeforeTheyAreRecordedReachAReplayingWatcher) {
  Rig rig("unrecorded-steps");
  const std::string id = rig.JobWithHistory(kLongHistory);
  Watch watch(rig, id, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (int64_t n = kLongHistory + 1; n <= kLongHistory + 3; ++n) {
    rig.PublishStep(id, n);                            // refused by the store: published only
    if (n == kLongHistory + 1) rig.RecordStep(id, n);  // recorded at once after all
  }
  rig.Fail(id);
  const std::vector<JobEvent> events = watch.Rest();
  int64_t steps = 0;
  for (const JobEvent& e : events) {
    if (!e.has_step()) continue;
    ++steps;
    EXPECT_EQ(e.step().step(), steps) << "steps in order, each once";
  }
  EXPECT_EQ(steps, kLongHistory + 3);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(Describe(events.back()), "JOB_STATE_FAILED");
}

// A job deleted (DeleteJob) while its long history is replayed: the stream ends NOT_FOUND, not
// with the job's end state after a history cut short.
TEST(TrainingServiceTest, AJobDeletedDuringItsReplayEndsTheStreamNotFound) {
  Rig rig("deleted-replay");
  const std::string id = rig.JobWithHistory(kLongHistory);
  rig.Fail(id);
  Watch watch(rig, id, 0);
  ASSERT_TRUE(rig.store().Delete(id).ok());
  const grpc::Status status = watch.RestAndStatus();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << status.error_message();
  EXPECT_LT(watch.events().size(), static_cast<size_t>(kLongHistory));
  for (const JobEvent& e : watch.events()) {
    EXPECT_FALSE(e.has_failed() || (e.has_state() && e.state() == lorad::v1::JOB_STATE_FAILED))
        << "the end of a history cut short";
  }
}

// from_step leaves out earlier steps live as well as replayed (a job resumed from a checkpoint
// reports the steps after it again).
TEST(TrainingServiceTest, FromStepHoldsForLiveEventsToo) {
  Rig rig("from-step");
  const std::string id = rig.RunningJob();
  for (int64_t n = 1; n <= 5; ++n) rig.Step(id, n);
  Watch watch(rig, id, 4);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  for (int64_t n = 2; n <= 6; ++n) {  // resumed from step 1's checkpoint
    rig.Step(id, n);
    rig.Eval(id, n);
  }
  rig.Fail(id);
  std::vector<std::string> got;
  for (const JobEvent& e : watch.Rest()) got.push_back(Describe(e));
  const std::vector<std::string> expected = {"JOB_STATE_QUEUED", "JOB_STATE_RUNNING",
                                             "step 4",           "step 5",
                                             "eval 4",           "eval 5",
                                             "step 6",           "eval 6",
                                             "failed",           "JOB_STATE_FAILED"};
  // Steps 4 and 5 come once (from the history); their evaluations arrived live.
  EXPECT_EQ(got, expected);
}

// Watches opened while the job publishes steps, from a step it has not reached: none gets an
// earlier step (from_step was set after the subscription, so a step published between the two
// reached the client now and then: 7 watches of 150 in a stress run).
TEST(TrainingServiceTest, FromStepHoldsForEventsPublishedAsTheWatchOpens) {
  Rig rig("from-step-race");
  const std::string id = rig.RunningJob();
  std::atomic<bool> publishing{true};
  std::thread job([&] {
    for (int64_t n = 1; publishing.load(); ++n) rig.PublishStep(id, n);
  });
  std::vector<std::unique_ptr<Watch>> watches;
  for (int i = 0; i < 40; ++i) watches.push_back(std::make_unique<Watch>(rig, id, 1000000000));
  publishing = false;
  job.join();
  rig.Fail(id);
  int64_t early_steps = 0;
  for (auto& watch : watches) {
    for (const JobEvent& e : watch->Rest()) early_steps += e.has_step();
  }
  EXPECT_EQ(early_steps, 0);
}

// A running job that a restart queued again ends its replay queued, and its next start is sent.
TEST(TrainingServiceTest, AJobARestartQueuedAgainIsWatchedQueuedThenRunning) {
  Rig rig("requeued");
  const std::string id = rig.RunningJob();
  for (int64_t n = 1; n <= 3; ++n) rig.Step(id, n);
  auto recovered = rig.store().RecoverAfterRestart();
  ASSERT_TRUE(recovered.ok()) << recovered.status();
  ASSERT_EQ(recovered->requeued, std::vector<std::string>{id});
  Watch watch(rig, id, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ASSERT_TRUE(rig.store().MarkRunning(id, 1750000000000).ok());
  rig.hub().Publish(StateEvent(id, JobState::kRunning, 1750000000000));
  rig.Step(id, 4);
  rig.Fail(id);
  std::vector<std::string> got;
  for (const JobEvent& e : watch.Rest()) got.push_back(Describe(e));
  const std::vector<std::string> expected = {
      "JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "step 1", "step 2", "step 3",
      "JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "step 4", "failed", "JOB_STATE_FAILED"};
  EXPECT_EQ(got, expected);
}

// Fields of a spec this lorad does not know are never returned (SubmitJob drops them; a job stored
// with them, by an older lorad, is listed without them): a page of such jobs was hundreds of MB.
TEST(TrainingServiceTest, JobsAreListedWithoutFieldsThisLoradDoesNotKnow) {
  Rig rig("unknown-fields");
  lorad::v1::JobSpec spec;
  spec.set_adapter_name("bot");
  spec.GetReflection()->MutableUnknownFields(&spec)->AddLengthDelimited(1000,
                                                                        std::string(1 << 20, 'x'));
  auto job = rig.store().Insert(spec.SerializeAsString(), "bot", 0, 0, 64);
  ASSERT_TRUE(job.ok()) << job.status();
  grpc::ClientContext list_context;
  lorad::v1::ListJobsRequest list;
  lorad::v1::ListJobsResponse page;
  ASSERT_TRUE(rig.stub().ListJobs(&list_context, list, &page).ok());
  ASSERT_EQ(page.jobs_size(), 1);
  EXPECT_EQ(page.jobs(0).spec().adapter_name(), "bot");
  EXPECT_LT(page.ByteSizeLong(), 1000u);
  grpc::ClientContext get_context;
  lorad::v1::GetJobRequest get;
  get.set_job_id(job->id);
  lorad::v1::Job got;
  ASSERT_TRUE(rig.stub().GetJob(&get_context, get, &got).ok());
  EXPECT_LT(got.ByteSizeLong(), 1000u);
}

// A job of one inline example, 3 steps.
lorad::v1::SubmitJobRequest OneExampleJob() {
  lorad::v1::SubmitJobRequest request;
  request.mutable_spec()->set_adapter_name("bot");
  request.mutable_spec()->mutable_dataset()->add_inline_examples()->set_json(
      R"({"question": "q", "answer": "a"})");
  request.mutable_spec()->mutable_training()->set_max_steps(3);
  return request;
}

// SubmitJob reads the dataset and runs the model's checks on BlockingCalls' threads, not gRPC's:
// one worker and one place in its queue here, the first job held in check_job. A third call is
// refused while both are taken; at a stop the running one gives up and the queued one does not
// run: both are UNAVAILABLE (send again once lorad is back) and nothing is queued.
TEST(TrainingServiceTest, SubmissionsRunOffGrpcsThreadsBoundedAndEndAtAStop) {
  BlockingCalls blocking(/*threads=*/1, /*max_queued=*/1);
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false, release = false;
  TrainingServiceOptions options;
  options.blocking = &blocking;
  options.check_job = [&](const lorad::v1::JobSpec&, const std::atomic<bool>*) {
    std::unique_lock<std::mutex> lock(mu);
    entered = true;
    cv.notify_all();
    cv.wait(lock, [&] { return release; });
    return absl::OkStatus();
  };
  Rig rig("blocking-submits", std::move(options));
  const lorad::v1::SubmitJobRequest request = OneExampleJob();
  const auto submit = [&] {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    lorad::v1::Job job;
    return rig.stub().SubmitJob(&context, request, &job);
  };
  grpc::Status first, second;
  std::thread a, b, stop;
  // Whatever fails below, nothing is left blocked or unjoined (std::thread's destructor would
  // end the whole test binary).
  const auto cleanup = [&] {
    {
      std::lock_guard<std::mutex> lock(mu);
      release = true;
    }
    cv.notify_all();
    for (std::thread* t : {&stop, &a, &b}) {
      if (t->joinable()) t->join();
    }
    blocking.Stop();
  };
  struct Finally {
    std::function<void()> run;
    ~Finally() { run(); }
  } finally{cleanup};
  a = std::thread([&] { first = submit(); });
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return entered; }));
  }
  b = std::thread([&] { second = submit(); });
  for (int i = 0; i < 3000 && blocking.queued() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(blocking.queued(), 1u);
  const grpc::Status third = submit();
  EXPECT_EQ(third.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << third.error_message();
  EXPECT_EQ(third.error_message(),
            "1 calls that read files (job submissions, adapter loads) are waiting already; send "
            "it again shortly");
  stop = std::thread([&] { blocking.Stop(); });
  while (!blocking.stopping().load()) std::this_thread::yield();
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
  }
  cv.notify_all();
  stop.join();
  a.join();
  b.join();
  EXPECT_EQ(first.error_code(), grpc::StatusCode::UNAVAILABLE) << first.error_message();
  EXPECT_EQ(first.error_message(), "lorad is stopping; send the call again once it is back");
  EXPECT_EQ(second.error_code(), grpc::StatusCode::UNAVAILABLE) << second.error_message();
  auto jobs = rig.store().List({}, 10, "");
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_TRUE(jobs->jobs.empty()) << "a submission lorad gave up on was queued";
}

// A job on inline examples alone, and a submission sent again with its request_id, waited
// behind other submissions' dataset counts (two 400 MB files held every submission 12 s): they
// have threads of their own, and a resubmission is a lookup. Here the one thread for datasets is
// held by a file's submission until both have been answered.
TEST(TrainingServiceTest, InlineJobsAndResubmissionsDoNotWaitBehindDatasetCounts) {
  BlockingCalls blocking(/*threads=*/1, /*max_queued=*/1);
  BlockingCalls file_free(/*threads=*/1, /*max_queued=*/4);
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false, release = false;
  const fs::path root = fs::path(::testing::TempDir()) / "training_service_test-file-free";
  TrainingServiceOptions options;
  options.blocking = &blocking;
  options.file_free = &file_free;
  options.spec_limits.dataset_root = root.string();
  options.check_job = [&](const lorad::v1::JobSpec& spec, const std::atomic<bool>*) {
    if (spec.adapter_name() != "big") return absl::OkStatus();
    std::unique_lock<std::mutex> lock(mu);
    entered = true;
    cv.notify_all();
    cv.wait(lock, [&] { return release; });
    return absl::OkStatus();
  };
  Rig rig("file-free", std::move(options));
  for (const char* file : {"big.jsonl", "small.jsonl"}) {
    std::ofstream(root / file) << R"({"question": "q", "answer": "a"})"
                               << "\n";
  }
  const auto submit = [&](const lorad::v1::SubmitJobRequest& request, lorad::v1::Job* job) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    return rig.stub().SubmitJob(&context, request, job);
  };
  // Sent again while the dataset thread is taken, a file's job known by its request_id.
  lorad::v1::SubmitJobRequest retried;
  retried.mutable_spec()->set_adapter_name("small");
  retried.mutable_spec()->mutable_dataset()->set_path("small.jsonl");
  retried.set_request_id("retry-1");
  lorad::v1::Job first;
  ASSERT_TRUE(submit(retried, &first).ok());
  lorad::v1::SubmitJobRequest from_file;
  from_file.mutable_spec()->set_adapter_name("big");
  from_file.mutable_spec()->mutable_dataset()->set_path("big.jsonl");
  grpc::Status held;
  std::thread counting([&] {
    lorad::v1::Job job;
    held = submit(from_file, &job);
  });
  struct Finally {
    std::function<void()> run;
    ~Finally() { run(); }
  } finally{[&] {
    {
      std::lock_guard<std::mutex> lock(mu);
      release = true;
    }
    cv.notify_all();
    if (counting.joinable()) counting.join();
    blocking.Stop();
    file_free.Stop();
  }};
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return entered; }));
  }
  lorad::v1::Job inline_job, again;
  const grpc::Status inline_status = submit(OneExampleJob(), &inline_job);
  EXPECT_TRUE(inline_status.ok()) << inline_status.error_message();
  const grpc::Status again_status = submit(retried, &again);
  EXPECT_TRUE(again_status.ok()) << again_status.error_message();
  EXPECT_EQ(again.id(), first.id());
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
  }
  cv.notify_all();
  counting.join();
  EXPECT_TRUE(held.ok()) << held.error_message();
}

// A submission whose client gave up (its deadline passed) while its dataset was checked is not
// queued: the client saw the call fail, and the same job sent again would train twice. check_job
// holds the call until the service is told the client is gone, then lets it go on.
TEST(TrainingServiceTest, ASubmissionWhoseClientGaveUpIsNotQueued) {
  BlockingCalls blocking(/*threads=*/1, /*max_queued=*/4);
  std::atomic<bool> told{false}, returned{false};
  TrainingServiceOptions options;
  options.blocking = &blocking;
  options.check_job = [&](const lorad::v1::JobSpec&, const std::atomic<bool>* abandon) {
    for (int i = 0; i < 3000 && abandon != nullptr && !abandon->load(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    told = abandon != nullptr && abandon->load();
    returned = true;
    return absl::OkStatus();
  };
  Rig rig("client-gave-up", std::move(options));
  const lorad::v1::SubmitJobRequest request = OneExampleJob();
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  lorad::v1::Job job;
  const grpc::Status status = rig.stub().SubmitJob(&context, request, &job);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
  // Not stopped before check_job returned: a stop tells running work to give up too.
  for (int i = 0; i < 3000 && !returned.load(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(told.load()) << "the service was never told that the client gave up";
  blocking.Stop();  // waits for the submission's work to end
  auto jobs = rig.store().List({}, 10, "");
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_TRUE(jobs->jobs.empty()) << "a submission its client gave up on was queued";
}

// A SubmitJob sent again with its request_id (a retry after a lost reply, a script run twice)
// returns the job the first one queued, without reading its dataset again, also when the two
// arrive at once; the same id with another spec is ALREADY_EXISTS, and a malformed one is refused.
TEST(TrainingServiceTest, ASubmissionSentAgainWithItsRequestIdReturnsTheJobItQueued) {
  std::atomic<int> checks{0};
  TrainingServiceOptions options;
  options.check_job = [&](const lorad::v1::JobSpec&, const std::atomic<bool>*) {
    ++checks;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // two at once meet here
    return absl::OkStatus();
  };
  Rig rig("request-id", std::move(options));
  const auto submit = [&](const lorad::v1::SubmitJobRequest& request, lorad::v1::Job* job) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    return rig.stub().SubmitJob(&context, request, job);
  };
  lorad::v1::SubmitJobRequest request = OneExampleJob();
  request.set_request_id("nightly-2026-12-06");
  lorad::v1::Job first, again;
  ASSERT_TRUE(submit(request, &first).ok());
  ASSERT_TRUE(submit(request, &again).ok());
  EXPECT_EQ(again.id(), first.id());
  EXPECT_EQ(again.spec().adapter_name(), "bot");
  EXPECT_EQ(checks.load(), 1) << "the retry read the dataset again";

  // Two at once with a new id: one job.
  request.set_request_id("6f1c0d2e-3b4a-4c5d-8e9f-0a1b2c3d4e5f");
  lorad::v1::Job a, b;
  grpc::Status status_a, status_b;
  std::thread ta([&] { status_a = submit(request, &a); });
  std::thread tb([&] { status_b = submit(request, &b); });
  ta.join();
  tb.join();
  ASSERT_TRUE(status_a.ok()) << status_a.error_message();
  ASSERT_TRUE(status_b.ok()) << status_b.error_message();
  EXPECT_EQ(a.id(), b.id());
  EXPECT_NE(a.id(), first.id());

  // Without one, every call queues a job.
  lorad::v1::SubmitJobRequest plain = OneExampleJob();
  lorad::v1::Job p1, p2;
  ASSERT_TRUE(submit(plain, &p1).ok());
  ASSERT_TRUE(submit(plain, &p2).ok());
  EXPECT_NE(p1.id(), p2.id());
  auto jobs = rig.store().List({}, 10, "");
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_EQ(jobs->jobs.size(), 4u);

  lorad::v1::SubmitJobRequest other = OneExampleJob();
  other.mutable_spec()->mutable_training()->set_max_steps(4);
  other.set_request_id("nightly-2026-12-06");
  lorad::v1::Job refused;
  grpc::Status status = submit(other, &refused);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(status.error_message(),
            "request_id 'nightly-2026-12-06' queued job '" + first.id() +
                "' (adapter 'bot') with another spec; a new job needs a new request_id (or none)");
  for (const std::string& bad : {std::string("two words"), std::string(129, 'x')}) {
    other.set_request_id(bad);
    status = submit(other, &refused);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_EQ(status.error_message().rfind("request_id: ", 0), 0u) << status.error_message();
  }
  jobs = rig.store().List({}, 10, "");
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_EQ(jobs->jobs.size(), 4u);
}

// WatchJob streams open at once are bounded (each holds a page of history and a subscription);
// one more is RESOURCE_EXHAUSTED, and a closed one gives its place back.
TEST(TrainingServiceTest, WatchStreamsOpenAtOnceAreBounded) {
  TrainingServiceOptions options;
  options.max_watches = 2;
  Rig rig("watch-limit", options);
  const std::string id = rig.RunningJob();
  auto first = std::make_unique<Watch>(rig, id, 0);
  Watch second(rig, id, 0);
  grpc::ClientContext context;
  lorad::v1::WatchJobRequest request;
  request.set_job_id(id);
  auto third = rig.stub().WatchJob(&context, request);
  JobEvent e;
  EXPECT_FALSE(third->Read(&e));
  const grpc::Status refused = third->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.error_message().find("2 WatchJob streams are open"), std::string::npos);
  rig.Fail(id);  // the job ends: the watches close
  first->Rest();
  second.Rest();
  first.reset();
  // A place is free again once the server is done with a closed stream.
  bool admitted = false;
  for (int i = 0; i < 100 && !admitted; ++i) {
    grpc::ClientContext again_context;
    auto again = rig.stub().WatchJob(&again_context, request);
    admitted = again->Read(&e);
    while (again->Read(&e)) {
    }
    again->Finish().IgnoreError();
    if (!admitted) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_TRUE(admitted);
}

}  // namespace
}  // namespace lorad::server
