#include "server/job_runner.h"

#include <gtest/gtest.h>
#include <sqlite3.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/model/utf8.h"
#include "engine/train/checkpoint_folders.h"
#include "engine/train/dataset_reader.h"
#include "engine/train/training_memory.h"
#include "server/job_event_hub.h"
#include "server/job_spec_validator.h"
#include "server/job_store.h"
#include "server/metrics_registry.h"

namespace lorad::server {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// A JobRunner with everything real: the engine on the tiny fixture model (CPU), a job store in a
// temporary folder, the event hub; one job of `steps` steps on the Q&A fixture, queued.
class Rig {
 public:
  // `busy_timeout`: how long the job store's writes wait for a lock another connection holds
  // (0: refused at once, as a full disk refuses them).
  // `save_every`: the job's checkpoint cadence (0: only at the end), every checkpoint kept.
  // `memory_budget_bytes`, `max_running`: training.memory_budget_mib and max_running_jobs.
  Rig(const std::string& name, int steps,
      std::chrono::milliseconds busy_timeout = std::chrono::seconds(5), int save_every = 0,
      int64_t memory_budget_bytes = 0, int max_running = 1)
      : steps_(steps) {
    dir_ = fs::path(::testing::TempDir()) / ("job_runner_test-" + name);
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "datasets");
    fs::copy_file(fs::path(LORAD_SOURCE_DIR) / "tests/fixtures/qa_small.jsonl",
                  dir_ / "datasets/qa.jsonl");
    engine::EngineOptions options;
    const char* model = std::getenv("LORAD_TINY_MODEL");
    options.model_folder = model != nullptr ? model : LORAD_TINY_MODEL_DEFAULT;
    options.device = "cpu";
    options.training_memory_budget_bytes = memory_budget_bytes;
    options.max_training_jobs = std::max(1, max_running);
    auto started = engine::Engine::Start(options);
    EXPECT_TRUE(started.ok()) << started.status();
    engine_ = *std::move(started);
    auto store = JobStore::Open(db_path(), busy_timeout);
    EXPECT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
    lorad::v1::JobSpec spec;
    spec.set_adapter_name("runner-bot");
    spec.mutable_dataset()->set_path("qa.jsonl");
    spec.mutable_training()->set_max_steps(steps);
    spec.mutable_training()->set_micro_batch_size(2);
    spec.mutable_training()->set_grad_accum(1);
    spec.mutable_training()->set_max_seq_length(128);
    spec.mutable_training()->set_save_every(save_every);
    spec.mutable_training()->set_keep_checkpoints(0);
    spec.mutable_lora()->set_r(4);
    JobSpecLimits limits;
    limits.dataset_root = (dir_ / "datasets").string();
    auto validated = ValidateJobSpec(spec, limits);
    EXPECT_TRUE(validated.ok()) << validated.status();
    spec_ = spec.SerializeAsString();
    job_id_ = InsertJob();
    runner_ =
        std::make_unique<JobRunner>(*engine_, *store_, hub_, metrics_, (dir_ / "jobs").string(),
                                    limits.dataset_root, max_running);
  }

  ~Rig() {
    runner_->Stop();
    engine_->Stop();
  }

  // Another job of the same spec, queued.
  std::string InsertJob() {
    auto record = store_->Insert(spec_, "runner-bot", 0, steps_, 64);
    EXPECT_TRUE(record.ok()) << record.status();
    return record.ok() ? record->id : "";
  }
  // The rig's job spec, for a job of another shape.
  lorad::v1::JobSpec Spec() const {
    lorad::v1::JobSpec spec;
    spec.ParseFromString(spec_);
    return spec;
  }
  // A job of `spec`, queued, and the engine's estimate of its memory.
  std::string InsertJob(const lorad::v1::JobSpec& spec) {
    auto record = store_->Insert(spec.SerializeAsString(), spec.adapter_name(), 0,
                                 spec.training().max_steps(), 64);
    EXPECT_TRUE(record.ok()) << record.status();
    return record.ok() ? record->id : "";
  }
  int64_t EstimatedBytes(const lorad::v1::JobSpec& spec) const {
    auto config =
        TrainingJobConfigFromSpec(spec, (dir_ / "estimate").string(), (dir_ / "datasets").string());
    EXPECT_TRUE(config.ok()) << config.status();
    return engine::EstimateTrainingBytes(engine_->model_config(), *config, /*element_bytes=*/4)
        .total();
  }

  std::string db_path() const { return (dir_ / "jobs.db").string(); }
  fs::path dataset() const { return dir_ / "datasets/qa.jsonl"; }
  fs::path job_dir() const { return dir_ / "jobs" / job_id_; }
  fs::path job_dir(const std::string& id) const { return dir_ / "jobs" / id; }
  const std::string& job_id() const { return job_id_; }
  engine::Engine& engine() { return *engine_; }
  JobStore& store() { return *store_; }
  JobEventHub& hub() { return hub_; }
  JobRunner& runner() { return *runner_; }

  JobState State(const std::string& id = "") {
    auto job = store_->Get(id.empty() ? job_id_ : id);
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? job->state : JobState::kQueued;
  }

  // Waits up to `seconds` for `done`; whether it came.
  static bool WaitFor(const std::function<bool()>& done, int seconds) {
    const auto end = Clock::now() + std::chrono::seconds(seconds);
    while (!done()) {
      if (Clock::now() > end) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return true;
  }

 private:
  fs::path dir_;
  std::unique_ptr<engine::Engine> engine_;
  std::unique_ptr<JobStore> store_;
  JobEventHub hub_;
  MetricsRegistry metrics_;
  std::unique_ptr<JobRunner> runner_;
  int steps_;
  std::string spec_;
  std::string job_id_;
};

// What a run that died recorded: steps 1-9 (loss 99, so that a step of a later run tells itself
// apart) and an evaluation at step 8.
void RecordDeadRun(JobStore& store, const std::string& id) {
  for (int64_t n = 1; n <= 9; ++n) {
    StepRecord step;
    step.step = n;
    step.loss = 99;
    ASSERT_TRUE(store.AppendStep(id, step).ok());
  }
  lorad::v1::JobEvent eval;
  eval.mutable_eval()->set_step(8);
  ASSERT_TRUE(
      store.AppendEvent(id, {8, static_cast<int32_t>(eval.event_case()), eval.SerializeAsString()})
          .ok());
}

// The steps the store holds for the job, by number.
std::vector<int64_t> StepNumbers(JobStore& store, const std::string& id) {
  auto steps = store.Steps(id, 0);
  EXPECT_TRUE(steps.ok()) << steps.status();
  std::vector<int64_t> numbers;
  for (const StepRecord& s : steps.ok() ? *steps : std::vector<StepRecord>{}) {
    numbers.push_back(s.step);
  }
  return numbers;
}

// A job resumed after the process died keeps no history past the point it resumed from: the
// dead run's later steps and events showed progress the job had not made (GetJob's last step,
// ListJobs, a watch's replay), for good if it was then cancelled. Two jobs die (their steps 1-9
// recorded by a run that was gone): one resumes from a checkpoint at step 4 (a copy of the first
// job's), one from its first step (no checkpoint); each keeps only its own 6 steps.
TEST(JobRunnerTest, AJobResumedAfterADeathForgetsTheDeadRunsStepsPastItsResumePoint) {
  Rig rig("forget-dead-run", 6, std::chrono::seconds(5), /*save_every=*/2);
  const std::string from_checkpoint = rig.InsertJob(), from_start = rig.InsertJob();
  for (const std::string& id : {from_checkpoint, from_start}) {
    ASSERT_TRUE(rig.store().MarkRunning(id).ok());  // not queued: the first job runs alone
  }
  rig.runner().Start();
  ASSERT_TRUE(Rig::WaitFor([&] { return rig.State() == JobState::kSucceeded; }, 120));
  std::string checkpoint_4;
  for (const auto& [step, folder] : engine::CompleteCheckpoints(rig.job_dir().string())) {
    if (step == 4) checkpoint_4 = folder.string();
  }
  ASSERT_FALSE(checkpoint_4.empty());
  fs::create_directories(rig.job_dir(from_checkpoint));
  fs::copy(checkpoint_4, rig.job_dir(from_checkpoint) / fs::path(checkpoint_4).filename(),
           fs::copy_options::recursive);
  for (const std::string& id : {from_checkpoint, from_start}) {
    RecordDeadRun(rig.store(), id);
  }
  ASSERT_TRUE(rig.store().RecoverAfterRestart().ok());  // both queued again
  rig.runner().Wake();
  for (const std::string& id : {from_checkpoint, from_start}) {
    ASSERT_TRUE(Rig::WaitFor([&] { return rig.State(id) == JobState::kSucceeded; }, 120)) << id;
    EXPECT_EQ(StepNumbers(rig.store(), id), (std::vector<int64_t>{1, 2, 3, 4, 5, 6})) << id;
    auto events = rig.store().Events(id, 7);
    ASSERT_TRUE(events.ok()) << events.status();
    EXPECT_TRUE(events->empty()) << id << ": the dead run's evaluation at step 8 is kept";
    auto steps = rig.store().Steps(id, 5);
    ASSERT_TRUE(steps.ok());
    for (const StepRecord& s : *steps) EXPECT_NE(s.loss, 99) << id << " step " << s.step;
  }
  // The one resumed from step 4 kept the dead run's steps up to it.
  auto kept = rig.store().Steps(from_checkpoint, 1, 4);
  ASSERT_TRUE(kept.ok());
  for (const StepRecord& s : *kept) EXPECT_EQ(s.loss, 99) << "step " << s.step;
}

// RetryJob forgets at once what the job recorded past the checkpoint it will resume from (a
// watch or a listing while it waits showed the last run's steps, and a watch opened then missed
// the new run's), and tells a job still running that only ended jobs are retried.
TEST(JobRunnerTest, ARetriedJobForgetsItsHistoryPastItsCheckpointAtOnce) {
  Rig rig("retry-forgets", 6);  // the runner is not started: nothing runs the job
  const std::string id = rig.job_id();
  ASSERT_TRUE(rig.store().MarkRunning(id).ok());
  auto refused = rig.runner().RetryJob(id, 64);
  EXPECT_TRUE(absl::IsFailedPrecondition(refused.status())) << refused.status();
  EXPECT_NE(refused.status().message().find("is running; only a failed or cancelled job"),
            std::string::npos)
      << refused.status();
  RecordDeadRun(rig.store(), id);
  ASSERT_TRUE(rig.store().MarkFailed(id, "boom").ok());
  // A complete checkpoint at step 4 (its files are what makes it one).
  const fs::path checkpoint = rig.job_dir() / "checkpoint-4";
  for (const std::string& file : engine::CheckpointFiles()) {
    fs::create_directories((checkpoint / file).parent_path());
    std::ofstream(checkpoint / file) << "x";
  }
  auto retried = rig.runner().RetryJob(id, 64);
  ASSERT_TRUE(retried.ok()) << retried.status();
  EXPECT_EQ(retried->state, JobState::kQueued);
  EXPECT_EQ(StepNumbers(rig.store(), id), (std::vector<int64_t>{1, 2, 3, 4}));
  auto events = rig.store().Events(id, 5);
  ASSERT_TRUE(events.ok()) << events.status();
  EXPECT_TRUE(events->empty());
}

// A CancelJob that lands as the job starts (after the store marked it running, before the engine
// had it, which then ignored the cancel) stops it: it trained every step before. The hub's
// listeners run on the runner's thread, and the RUNNING state is published in that window.
// The inline examples' file the job trains on: one record a line, a valid record's line breaks
// (between tokens) made spaces, and a record that was invalid at submit (a raw line break inside
// a string: skipped there with skip_bad_lines) still invalid. Replaced by a space, it became
// {"text": "a b"}: counted as skipped at submit, then trained on as altered text.
TEST(JobRunnerTest, AnInlineExampleInvalidAtSubmitStaysInvalidInTheJobsFile) {
  const fs::path dir = fs::path(::testing::TempDir()) / "job_runner_test-inline";
  fs::remove_all(dir);
  lorad::v1::JobSpec spec;
  spec.set_adapter_name("inline-bot");
  spec.mutable_dataset()->set_skip_bad_lines(true);
  const std::string texts[] = {R"({"text": "first"})", "{\"text\": \"a\nb\"}",
                               "{\"text\":\r\n \"second\"}"};
  for (const std::string& t : texts) spec.mutable_dataset()->add_inline_examples()->set_json(t);
  auto config = TrainingJobConfigFromSpec(spec, (dir / "job").string(), (dir / "data").string());
  ASSERT_TRUE(config.ok()) << config.status();
  std::ifstream in(config->data.path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 3u);
  auto format = engine::DatasetFormatFromName(config->data.format);
  ASSERT_TRUE(format.ok()) << format.status();
  for (int i = 0; i < 3; ++i) {
    const bool valid_at_submit = engine::DatasetReader::ParseRecord(texts[i], *format, "").ok();
    auto read = engine::DatasetReader::ParseRecord(lines[i], *format, "");
    EXPECT_EQ(read.ok(), valid_at_submit) << lines[i];
  }
  EXPECT_FALSE(engine::DatasetReader::ParseRecord(texts[1], *format, "").ok());
  EXPECT_EQ(lines[2], "{\"text\":\t\t \"second\"}");
}

// The inline examples' file holds what jobs.db (0600) keeps from other accounts: it was written
// 0644 in a 0755 folder. Private now, and one an older lorad wrote is made private at the next
// start even when its content is unchanged.
TEST(JobRunnerTest, TheInlineExamplesFileIsPrivate) {
  const fs::path dir = fs::path(::testing::TempDir()) / "job_runner_test-inline-private";
  fs::remove_all(dir);
  lorad::v1::JobSpec spec;
  spec.set_adapter_name("inline-bot");
  spec.mutable_dataset()->add_inline_examples()->set_json(R"({"text": "a secret"})");
  auto config = TrainingJobConfigFromSpec(spec, (dir / "job").string(), (dir / "data").string());
  ASSERT_TRUE(config.ok()) << config.status();
  const auto mode = [&] { return fs::status(config->data.path).permissions() & fs::perms::all; };
  EXPECT_EQ(mode(), fs::perms::owner_read | fs::perms::owner_write);
  fs::permissions(config->data.path, fs::perms(0644));
  config = TrainingJobConfigFromSpec(spec, (dir / "job").string(), (dir / "data").string());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(mode(), fs::perms::owner_read | fs::perms::owner_write);
}

// Those an older lorad wrote 0644 are made private at start (an ended job never starts again to
// have its inline file rewritten), and nothing else in a job's folder is touched.
TEST(JobRunnerTest, AStartMakesOlderJobsExampleFilesPrivate) {
  const fs::path jobs = fs::path(::testing::TempDir()) / "job_runner_test-examples-private";
  fs::remove_all(jobs);
  fs::create_directories(jobs / "job-a");
  fs::create_directories(jobs / "job-b");
  const fs::path files[] = {
      jobs / "job-a" / "inline_dataset.jsonl", jobs / "job-a" / "eval_report.json",
      jobs / "job-b" / "eval_report.json", jobs / "job-a" / "adapter_config.json"};
  for (const fs::path& file : files) {
    std::ofstream(file) << "{}\n";
    fs::permissions(file, fs::perms(0644));
  }
  fs::permissions(files[2], fs::perms(0600));  // already private: not counted
  EXPECT_EQ(MakeJobExamplesPrivate(jobs.string()), 2);
  const auto mode = [](const fs::path& f) { return fs::status(f).permissions() & fs::perms::all; };
  for (int i = 0; i < 3; ++i) EXPECT_EQ(mode(files[i]), fs::perms(0600)) << files[i];
  EXPECT_EQ(mode(files[3]), fs::perms(0644));
  EXPECT_EQ(MakeJobExamplesPrivate((jobs / "absent").string()), 0);
}

// A recorded dataset path the job can no longer read inside the root says why: the root pointed
// elsewhere since the job was submitted, or a symlink put in the file's place that leads out.
TEST(JobRunnerTest, ADatasetNoLongerInsideTheRootSaysWhetherTheRootOrTheFileChanged) {
  const fs::path dir = fs::path(::testing::TempDir()) / "job_runner_test-root-changed";
  fs::remove_all(dir);
  fs::create_directories(dir / "old");
  fs::create_directories(dir / "new");
  fs::create_directories(dir / "elsewhere");
  std::ofstream(dir / "old" / "qa.jsonl") << R"({"text": "a"})"
                                          << "\n";
  std::ofstream(dir / "elsewhere" / "qa.jsonl") << R"({"text": "b"})"
                                                << "\n";
  const std::string old_root = fs::weakly_canonical(dir / "old").string();
  lorad::v1::JobSpec spec;
  spec.set_adapter_name("rooted");
  spec.mutable_dataset()->set_path(old_root + "/qa.jsonl");
  auto config = TrainingJobConfigFromSpec(spec, (dir / "job").string(), (dir / "new").string());
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("storage.dataset_root changed"), std::string::npos)
      << config.status();
  fs::remove(dir / "old" / "qa.jsonl");
  fs::create_symlink(dir / "elsewhere" / "qa.jsonl", dir / "old" / "qa.jsonl");
  config = TrainingJobConfigFromSpec(spec, (dir / "job").string(), old_root);
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("a symlink put in its way"), std::string::npos)
      << config.status();
  EXPECT_EQ(config.status().message().find("dataset_root changed"), std::string::npos)
      << config.status();
}

TEST(JobRunnerTest, ACancelAsTheJobStartsStopsIt) {
  Rig rig("cancel-at-start", 400);
  std::atomic<bool> cancelled{false};
  const int64_t subscription = rig.hub().Subscribe(rig.job_id(), [&](const lorad::v1::JobEvent& e) {
    if (e.has_state() && e.state() == lorad::v1::JOB_STATE_RUNNING && !cancelled.exchange(true)) {
      // TrainingService::CancelJob's sequence, minus gRPC.
      ASSERT_TRUE(rig.store().Cancel(rig.job_id()).ok());
      rig.runner().Cancel(rig.job_id());
    }
  });
  rig.runner().Start();
  ASSERT_TRUE(Rig::WaitFor([&] { return cancelled.load(); }, 60));
  ASSERT_TRUE(Rig::WaitFor([&] { return !rig.engine().TrainingActive(); }, 120))
      << "the cancelled job still trains";
  rig.hub().Unsubscribe(subscription);
  EXPECT_EQ(rig.State(), JobState::kCancelled);
  EXPECT_FALSE(fs::exists(rig.job_dir() / "adapter")) << "it trained to its end";
  EXPECT_FALSE(rig.engine().adapters().Contains("runner-bot"));
}

// A job first in line that waits for training memory does not hold back, for nothing, a smaller
// one behind it that fits now: that one starts first where the one waiting keeps its room however
// the running jobs end (and not where it would take it). Sizes, by the engine's estimate: two
// running jobs and a third of their `small` shape, a `large` one first in line, a `tiny` one; the
// budget holds small + large + tiny. The large one fits once either running job ends; the third
// small one would fit beside it alone (it did start, before a review: the large one then waited
// for both running jobs), the tiny one fits beside it and either running job.
TEST(JobRunnerTest, AJobThatLeavesRoomStartsAheadOfOneWaitingForMemory) {
  auto shaped = [](lorad::v1::JobSpec spec, const std::string& name, int micro_batch,
                   int seq_length) {
    spec.set_adapter_name(name);
    spec.mutable_training()->set_max_steps(100000);  // running until cancelled
    spec.mutable_training()->set_micro_batch_size(micro_batch);
    spec.mutable_training()->set_max_seq_length(seq_length);
    return spec;
  };
  int64_t small = 0, large = 0, tiny = 0;
  {
    Rig sizes("ahead-sizes", 1);
    small = sizes.EstimatedBytes(shaped(sizes.Spec(), "small", 2, 128));
    large = sizes.EstimatedBytes(shaped(sizes.Spec(), "large", 16, 128));
    tiny = sizes.EstimatedBytes(shaped(sizes.Spec(), "tiny", 1, 64));
  }
  // 2 small + large > budget: large waits; 3 small <= budget (the third fits now), small + large
  // + small > budget (it would take large's room); small + large + tiny = budget.
  ASSERT_LT(tiny, small);
  ASSERT_LE(2 * small, large + tiny) << "the shapes no longer give the sizes this test needs";
  Rig rig("ahead", 100000, std::chrono::seconds(5), 0,
          /*memory_budget_bytes=*/small + large + tiny, /*max_running=*/4);
  const std::string second_id = rig.InsertJob(shaped(rig.Spec(), "second", 2, 128));
  const std::string large_id = rig.InsertJob(shaped(rig.Spec(), "large", 16, 128));
  const std::string small_id = rig.InsertJob(shaped(rig.Spec(), "small", 2, 128));
  const std::string tiny_id = rig.InsertJob(shaped(rig.Spec(), "tiny", 1, 64));
  rig.runner().Start();
  ASSERT_TRUE(Rig::WaitFor([&] { return rig.State(tiny_id) == JobState::kRunning; }, 60))
      << "the tiny job waits behind the large one";
  EXPECT_EQ(rig.State(), JobState::kRunning);
  EXPECT_EQ(rig.State(second_id), JobState::kRunning);
  EXPECT_EQ(rig.State(large_id), JobState::kQueued);
  EXPECT_EQ(rig.State(small_id), JobState::kQueued) << "it took the large job's room";
  EXPECT_NE(rig.runner().WaitingFor(small_id, false).find("waits for training memory"),
            std::string::npos)
      << rig.runner().WaitingFor(small_id, false);
  // One of the jobs running before the large one waited ends: the large one starts beside the
  // other and the tiny one.
  ASSERT_TRUE(rig.store().Cancel(second_id).ok());
  rig.runner().Cancel(second_id);
  ASSERT_TRUE(Rig::WaitFor([&] { return rig.State(large_id) == JobState::kRunning; }, 60))
      << "the large job did not get its room";
  EXPECT_EQ(rig.State(), JobState::kRunning);
  EXPECT_EQ(rig.State(tiny_id), JobState::kRunning);
  EXPECT_EQ(rig.State(small_id), JobState::kQueued);
  for (const std::string& id : {rig.job_id(), large_id, tiny_id, small_id}) {
    ASSERT_TRUE(rig.store().Cancel(id).ok());
    rig.runner().Cancel(id);
  }
}

// A job that ends while the job database refuses writes (what a full disk does; here another
// connection holds its write lock) publishes its adapter only once its success is recorded: it
// never serves while the job reads as running, and the runner records it when writes work again.
TEST(JobRunnerTest, AJobThatEndsWhileTheDatabaseRefusesWritesSucceedsOnceItIsRecorded) {
  Rig rig("refused-writes", 1);
  sqlite3* blocker = nullptr;
  ASSERT_EQ(sqlite3_open(rig.db_path().c_str(), &blocker), SQLITE_OK);
  std::atomic<bool> locked{false};
  const int64_t subscription = rig.hub().Subscribe(rig.job_id(), [&](const lorad::v1::JobEvent& e) {
    // The last checkpoint's event comes just before the job's end: the lock is taken as it is
    // published (on the runner's thread), before the end is handled.
    if (e.has_checkpoint() && !locked.exchange(true)) {
      ASSERT_EQ(sqlite3_exec(blocker, "BEGIN IMMEDIATE;", nullptr, nullptr, nullptr), SQLITE_OK);
    }
  });
  rig.runner().Start();
  ASSERT_TRUE(Rig::WaitFor([&] { return locked.load(); }, 120));
  // The success's first record waits out the store's busy timeout (5 s) and fails.
  std::this_thread::sleep_for(std::chrono::seconds(7));
  ASSERT_TRUE(fs::exists(rig.job_dir() / "adapter"));
  EXPECT_EQ(rig.State(), JobState::kRunning);
  EXPECT_FALSE(rig.engine().adapters().Contains("runner-bot"))
      << "the adapter serves while its job reads as running";
  ASSERT_EQ(sqlite3_exec(blocker, "ROLLBACK;", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(blocker);
  // Recorded (the job reads as succeeded), then served, moments apart.
  EXPECT_TRUE(Rig::WaitFor(
      [&] {
        return rig.State() == JobState::kSucceeded &&
               rig.engine().adapters().Contains("runner-bot");
      },
      60));
  auto job = rig.store().Get(rig.job_id());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->adapter_version, 1) << "the failed tries published no version";
  rig.hub().Unsubscribe(subscription);
}

// A CancelJob while the job database refuses writes (what a full disk does; here another
// connection holds its write lock) stops the running job all the same: it trains no further, its
// adapter is never published, it reads as cancelled, and the runner records the cancel once the
// database takes writes again. (It was refused, and the job trained on.)
TEST(JobRunnerTest, ACancelTheDatabaseRefusesStopsTheJobAndIsRecordedLater) {
  Rig rig("refused-cancel", 100000);  // still training when the cancel lands, however slow
  std::atomic<int64_t> steps{0};
  const int64_t subscription = rig.hub().Subscribe(rig.job_id(), [&](const lorad::v1::JobEvent& e) {
    if (e.has_step()) steps = e.step().step();
  });
  rig.runner().Start();
  ASSERT_TRUE(Rig::WaitFor([&] { return steps.load() >= 1; }, 120));
  sqlite3* blocker = nullptr;
  ASSERT_EQ(sqlite3_open(rig.db_path().c_str(), &blocker), SQLITE_OK);
  sqlite3_busy_timeout(blocker, 5000);  // the runner may be writing a step just now
  ASSERT_EQ(sqlite3_exec(blocker, "BEGIN IMMEDIATE;", nullptr, nullptr, nullptr), SQLITE_OK);
  // TrainingService::CancelJob's sequence, minus gRPC (the write waits out the busy timeout).
  auto cancelled = rig.store().Cancel(rig.job_id());
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  EXPECT_EQ(cancelled->state, JobState::kCancelled);
  rig.runner().Cancel(rig.job_id());
  EXPECT_TRUE(Rig::WaitFor([&] { return !rig.engine().TrainingActive(); }, 120))
      << "the cancelled job still trains";
  EXPECT_EQ(rig.State(), JobState::kCancelled);
  sqlite3_stmt* stored = nullptr;  // the row itself still says running
  ASSERT_EQ(
      sqlite3_prepare_v2(blocker, "SELECT state FROM jobs WHERE id = ?;", -1, &stored, nullptr),
      SQLITE_OK);
  sqlite3_bind_text(stored, 1, rig.job_id().c_str(), -1, SQLITE_TRANSIENT);
  ASSERT_EQ(sqlite3_step(stored), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int64(stored, 0), static_cast<int64_t>(JobState::kRunning));
  sqlite3_finalize(stored);
  ASSERT_EQ(sqlite3_exec(blocker, "ROLLBACK;", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(blocker);
  EXPECT_TRUE(Rig::WaitFor([&] { return rig.store().UnrecordedCancels().empty(); }, 60))
      << "the runner did not record the cancel";
  rig.hub().Unsubscribe(subscription);
  auto reopened = JobStore::Open(rig.db_path());  // what the database itself says now
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  EXPECT_EQ((*reopened)->Get(rig.job_id())->state, JobState::kCancelled);
  EXPECT_FALSE(fs::exists(rig.job_dir() / "adapter")) << "it trained to its end";
  EXPECT_FALSE(rig.engine().adapters().Contains("runner-bot"));
}

// The process's CPU time, in seconds: a runner that retries at once spins a core.
double CpuSeconds() { return static_cast<double>(std::clock()) / CLOCKS_PER_SEC; }

// A job the job database refuses to mark running at once (what a full disk does; here another
// connection holds its write lock and the store waits for none) stays queued, and starts once the
// database takes writes again: the runner tries again every few seconds, not at once (a busy loop).
TEST(JobRunnerTest, AJobTheDatabaseRefusesToStartStartsOnceItTakesWrites) {
  Rig rig("refused-start", 1, std::chrono::milliseconds(0));
  sqlite3* blocker = nullptr;
  ASSERT_EQ(sqlite3_open(rig.db_path().c_str(), &blocker), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(blocker, "BEGIN IMMEDIATE;", nullptr, nullptr, nullptr), SQLITE_OK);
  rig.runner().Start();
  std::this_thread::sleep_for(std::chrono::seconds(1));
  const double cpu_before = CpuSeconds();
  std::this_thread::sleep_for(std::chrono::seconds(3));
  EXPECT_LT(CpuSeconds() - cpu_before, 1.0) << "the runner retried at once, in a loop";
  EXPECT_EQ(rig.State(), JobState::kQueued);
  EXPECT_FALSE(rig.engine().TrainingActive());
  ASSERT_EQ(sqlite3_exec(blocker, "ROLLBACK;", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(blocker);
  EXPECT_TRUE(Rig::WaitFor([&] { return rig.State() == JobState::kSucceeded; }, 60))
      << "the job never started after the database took writes again";
}

// A job that fails as it starts (its dataset became a symlink out of the dataset root while it
// was queued) while the job database refuses writes at once (a full disk) is failed once, not
// again on every turn of the runner (it was: a busy loop that published a failure each time); its
// failure is recorded once the database takes writes.
TEST(JobRunnerTest, AJobFailingAtStartWhileTheDatabaseRefusesWritesFailsOnce) {
  Rig rig("refused-failure", 1, std::chrono::milliseconds(0));
  const fs::path outside = rig.dataset().parent_path().parent_path() / "outside.jsonl";
  fs::rename(rig.dataset(), outside);
  fs::create_symlink(outside, rig.dataset());
  std::atomic<int> failures{0};
  const int64_t subscription = rig.hub().Subscribe(rig.job_id(), [&](const lorad::v1::JobEvent& e) {
    if (e.has_failed()) ++failures;
  });
  sqlite3* blocker = nullptr;
  ASSERT_EQ(sqlite3_open(rig.db_path().c_str(), &blocker), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(blocker, "BEGIN IMMEDIATE;", nullptr, nullptr, nullptr), SQLITE_OK);
  rig.runner().Start();
  ASSERT_TRUE(Rig::WaitFor([&] { return failures.load() >= 1; }, 60));
  const double cpu_before = CpuSeconds();
  std::this_thread::sleep_for(std::chrono::seconds(3));
  EXPECT_LT(CpuSeconds() - cpu_before, 1.0) << "the runner failed the job again, in a loop";
  EXPECT_EQ(failures.load(), 1);
  ASSERT_EQ(sqlite3_exec(blocker, "ROLLBACK;", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(blocker);
  EXPECT_TRUE(Rig::WaitFor([&] { return rig.State() == JobState::kFailed; }, 60));
  rig.hub().Unsubscribe(subscription);
  EXPECT_EQ(failures.load(), 1);
}

// A queued job whose folder storage refuses when its turn comes (a full disk, jobs/ not
// writable; here jobs/ leads into /sys, where even root may not make a folder: EPERM) stays
// queued and starts once the folder can be made: it was failed for good.
TEST(JobRunnerTest, AJobWhoseFolderStorageRefusesWaitsAndStartsOnceItCan) {
  ASSERT_NE(::mkdir("/sys/kernel/lorad-job-runner-test", 0755), 0);
  ASSERT_EQ(errno, EPERM) << "this test needs /sys, where mkdir is refused with EPERM";
  Rig rig("storage-refuses", 1);
  fs::remove_all(rig.job_dir().parent_path());
  fs::create_directory_symlink("/sys/kernel", rig.job_dir().parent_path());
  rig.runner().Start();
  std::this_thread::sleep_for(std::chrono::seconds(2));
  EXPECT_EQ(rig.State(), JobState::kQueued);
  // Job.waiting_for says why (it said "nothing: it starts next").
  const std::string why = rig.runner().WaitingFor(rig.job_id(), /*first_in_line=*/true);
  EXPECT_EQ(why.rfind("it cannot start: cannot create ", 0), 0u) << why;
  EXPECT_NE(why.find("; tried again every few seconds"), std::string::npos) << why;
  fs::remove(rig.job_dir().parent_path());
  fs::create_directories(rig.job_dir().parent_path());
  EXPECT_TRUE(Rig::WaitFor([&] { return rig.State() == JobState::kSucceeded; }, 60))
      << "the job never started after its folder could be made";
  EXPECT_EQ(rig.runner().WaitingFor(rig.job_id(), true), "");
}

// Steps the job database refuses when they come (what a full disk does; here another
// connection holds its write lock for a while) are recorded once it takes writes again: the
// job's history, which WatchJob replays, lacks none of them.
TEST(JobRunnerTest, StepsTheDatabaseRefusedAreRecordedOnceItTakesWritesAgain) {
  Rig rig("refused-steps", 6);
  sqlite3* blocker = nullptr;
  ASSERT_EQ(sqlite3_open(rig.db_path().c_str(), &blocker), SQLITE_OK);
  std::atomic<bool> locked{false};
  std::thread release;
  const int64_t subscription = rig.hub().Subscribe(rig.job_id(), [&](const lorad::v1::JobEvent& e) {
    // Step 2 is recorded as it is published; the steps after it meet the lock (the store's
    // busy timeout is 5 s), until it goes a while later.
    if (e.has_step() && e.step().step() == 2 && !locked.exchange(true)) {
      ASSERT_EQ(sqlite3_exec(blocker, "BEGIN IMMEDIATE;", nullptr, nullptr, nullptr), SQLITE_OK);
      release = std::thread([blocker] {
        std::this_thread::sleep_for(std::chrono::seconds(8));
        sqlite3_exec(blocker, "ROLLBACK;", nullptr, nullptr, nullptr);
      });
    }
  });
  rig.runner().Start();
  ASSERT_TRUE(Rig::WaitFor([&] { return locked.load(); }, 120));
  ASSERT_TRUE(Rig::WaitFor([&] { return rig.State() == JobState::kSucceeded; }, 120));
  release.join();
  sqlite3_close(blocker);
  rig.hub().Unsubscribe(subscription);
  auto steps = rig.store().Steps(rig.job_id(), 0);
  ASSERT_TRUE(steps.ok()) << steps.status();
  std::vector<int64_t> numbers;
  for (const StepRecord& s : *steps) numbers.push_back(s.step);
  EXPECT_EQ(numbers, (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
}

// A job whose dataset became unreadable after it was submitted fails with the parser's error,
// which quotes the bytes it read: invalid UTF-8 here. proto3 strings must be UTF-8 (a Python
// client refuses a Job or JobEvent that is not), so what is stored and sent is made valid.
TEST(JobRunnerTest, AFailureQuotingInvalidUtf8IsStoredAndSentAsValidUtf8) {
  Rig rig("invalid-utf8-error", 2);
  std::ofstream(rig.dataset(), std::ios::binary | std::ios::trunc)
      << "{\"question\": \"q\", \"answer\": \"bad \xFF\xFE byte\"}\n";
  std::mutex mu;
  std::string sent;
  const int64_t subscription = rig.hub().Subscribe(rig.job_id(), [&](const lorad::v1::JobEvent& e) {
    std::lock_guard<std::mutex> lock(mu);
    if (e.has_failed()) sent = e.failed();
  });
  rig.runner().Start();
  ASSERT_TRUE(Rig::WaitFor([&] { return rig.State() == JobState::kFailed; }, 120));
  rig.hub().Unsubscribe(subscription);
  auto job = rig.store().Get(rig.job_id());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_NE(job->error.find("qa.jsonl:1"), std::string::npos) << job->error;
  EXPECT_TRUE(engine::IsValidUtf8(job->error)) << job->error;
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_EQ(sent, job->error);
}

// A succeeded job whose adapter serves from its folder is not deleted (a restart serves it from
// there); once the adapter is unloaded, DeleteJob removes the job's record and its folder. What
// a deletion a crash interrupted left is sorted out at the next start: the folder of a job whose
// record is still there goes back, one of a deleted job goes.
TEST(JobRunnerTest, AnEndedJobIsDeletedWithItsFolderOnceItsAdapterIsNotServed) {
  Rig rig("delete-ended", 1);
  const fs::path jobs = rig.job_dir().parent_path();
  const fs::path leftover = jobs / ".deleted-job-0123456789abcdef";
  fs::create_directories(leftover / "checkpoint-1");
  std::ofstream(leftover / "checkpoint-1/optimizer.pt") << "state";
  rig.runner().Start();
  ASSERT_TRUE(Rig::WaitFor([&] { return rig.State() == JobState::kSucceeded; }, 120));
  ASSERT_TRUE(fs::exists(rig.job_dir() / "adapter/adapter_model.safetensors"));
  fs::rename(rig.job_dir(), jobs / (".deleted-" + rig.job_id()));  // killed before its record went
  const std::vector<std::string> to_remove = FinishInterruptedDeletions(rig.store(), jobs.string());
  EXPECT_EQ(to_remove, std::vector<std::string>{leftover.string()});
  rig.runner().RemoveInBackground(to_remove);
  EXPECT_TRUE(Rig::WaitFor([&] { return !fs::exists(leftover); }, 30));
  EXPECT_TRUE(fs::exists(rig.job_dir() / "adapter/adapter_model.safetensors"));
  EXPECT_FALSE(fs::exists(jobs / (".deleted-" + rig.job_id())));

  absl::Status refused = rig.runner().DeleteJob(rig.job_id());
  EXPECT_TRUE(absl::IsFailedPrecondition(refused)) << refused;
  EXPECT_NE(refused.message().find("adapter 'runner-bot' (version 1) is served"), std::string::npos)
      << refused;
  EXPECT_TRUE(fs::exists(rig.job_dir() / "adapter"));
  EXPECT_TRUE(rig.store().Get(rig.job_id()).ok());

  // AdapterService::UnloadAdapter's sequence, minus gRPC.
  ASSERT_TRUE(rig.store().MarkAdapterUnserved("runner-bot", 1).ok());
  ASSERT_TRUE(rig.engine().adapters().Unload("runner-bot").ok());
  const absl::Status deleted = rig.runner().DeleteJob(rig.job_id());
  ASSERT_TRUE(deleted.ok()) << deleted;
  EXPECT_FALSE(fs::exists(rig.job_dir()));
  EXPECT_TRUE(fs::is_empty(rig.job_dir().parent_path())) << "nothing is left in the jobs folder";
  EXPECT_TRUE(absl::IsNotFound(rig.store().Get(rig.job_id()).status()));
  EXPECT_TRUE(rig.store().Steps(rig.job_id(), 0)->empty());
  EXPECT_TRUE(absl::IsNotFound(rig.runner().DeleteJob(rig.job_id())));
}

// A queued or running job is not deleted, and neither is a cancelled one whose trainer has not
// stopped yet (it may still write a checkpoint into the folder); once it has, it is.
TEST(JobRunnerTest, ACancelledJobIsDeletedOnlyOnceItsTrainerHasStopped) {
  Rig rig("delete-cancelled", 400);
  EXPECT_TRUE(absl::IsFailedPrecondition(rig.runner().DeleteJob(rig.job_id()))) << "queued";
  std::atomic<bool> cancelled{false};
  absl::Status while_stopping;
  const int64_t subscription = rig.hub().Subscribe(rig.job_id(), [&](const lorad::v1::JobEvent& e) {
    // On the runner's thread, as the job starts (a step's listener holds the runner's lock
    // that Cancel takes).
    if (e.has_state() && e.state() == lorad::v1::JOB_STATE_RUNNING && !cancelled.load()) {
      EXPECT_TRUE(absl::IsFailedPrecondition(rig.runner().DeleteJob(rig.job_id()))) << "running";
      // TrainingService::CancelJob's sequence, minus gRPC.
      ASSERT_TRUE(rig.store().Cancel(rig.job_id()).ok());
      rig.runner().Cancel(rig.job_id());
      while_stopping = rig.runner().DeleteJob(rig.job_id());
      cancelled = true;
    }
  });
  rig.runner().Start();
  ASSERT_TRUE(Rig::WaitFor([&] { return cancelled.load(); }, 120));
  rig.hub().Unsubscribe(subscription);
  EXPECT_TRUE(absl::IsFailedPrecondition(while_stopping)) << while_stopping;
  EXPECT_NE(while_stopping.message().find("still stopping"), std::string::npos) << while_stopping;
  absl::Status deleted;
  EXPECT_TRUE(Rig::WaitFor(
      [&] {
        deleted = rig.runner().DeleteJob(rig.job_id());
        return deleted.ok();
      },
      120))
      << deleted;
  EXPECT_FALSE(rig.engine().TrainingActive());
  EXPECT_FALSE(fs::exists(rig.job_dir()));
  EXPECT_TRUE(absl::IsNotFound(rig.store().Get(rig.job_id()).status()));
}

// What DeleteJob frees when the job database's full disk refuses to delete the record: the
// checkpoints (also a crash's temp and replaced ones) and the merged export, not the adapter or
// the reports; the bytes it says are those removed.
TEST(JobFolderTest, RemoveCheckpointsAndExportKeepsTheAdapterAndReports) {
  const fs::path folder =
      fs::path(::testing::TempDir()) / ("job-folder-room-" + std::to_string(getpid()));
  fs::remove_all(folder);
  const auto write = [&](const std::string& path, size_t bytes) {
    fs::create_directories((folder / path).parent_path());
    std::ofstream(folder / path) << std::string(bytes, 'x');
  };
  write("checkpoint-10/optimizer.pt", 1000);
  write("checkpoint-10/adapter/adapter_model.safetensors", 200);
  write(".checkpoint-20.tmp/optimizer.pt", 30);
  write(".replaced-checkpoint-10/trainer_state.json", 4);
  write("merged/model.safetensors", 5000);
  write("merged.tmp/model.safetensors", 60);
  write("adapter/adapter_model.safetensors", 700);
  write("eval_report.json", 8);
  write("inline_dataset.jsonl", 9);
  EXPECT_EQ(RemoveCheckpointsAndExport(folder.string()), 1000 + 200 + 30 + 4 + 5000 + 60);
  std::vector<std::string> left;
  for (const auto& entry : fs::directory_iterator(folder)) {
    left.push_back(entry.path().filename().string());
  }
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left,
            (std::vector<std::string>{"adapter", "eval_report.json", "inline_dataset.jsonl"}));
  EXPECT_TRUE(fs::exists(folder / "adapter/adapter_model.safetensors"));
  fs::remove_all(folder);
}

}  // namespace
}  // namespace lorad::server
