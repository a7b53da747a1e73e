// The trainer's writes: a periodic checkpoint written while the job trains on, and writes that
// fail (a full disk, a folder that cannot be written): a checkpoint
// or the end's adapter that cannot be written does not fail the job. It holds what it trained,
// does no work until the write may be tried again, says why (kWarning), and once the write goes
// through carries on as if nothing had happened.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include "absl/strings/match.h"
#include "engine/runtime/durable_file.h"
#include "engine/train/checkpoint_folders.h"
#include "engine/train/trainer.h"
#include "tests/unit/engine/train/trainer_test_fixture.h"

namespace lorad::engine {
namespace {

// Puts a regular file where the job's output folder was (every write into it then fails), and
// puts the folder back.
class BlockedFolder {
 public:
  explicit BlockedFolder(fs::path folder) : folder_(std::move(folder)) {
    aside_ = folder_.string() + ".aside";
    fs::create_directories(folder_);
    fs::rename(folder_, aside_);
    std::ofstream(folder_) << "in the way";
  }
  void Unblock() {
    fs::remove(folder_);
    fs::rename(aside_, folder_);
  }

 private:
  fs::path folder_, aside_;
};

int Count(const std::vector<TrainingEvent>& events, TrainingEvent::Kind kind) {
  return static_cast<int>(std::count_if(events.begin(), events.end(),
                                        [kind](const TrainingEvent& e) { return e.kind == kind; }));
}

// Steps `t` until a warning arrives (or the job ends): the warning's message.
std::string StepUntilWarning(Trainer& t, const std::vector<TrainingEvent>& events) {
  while (!t.done() && Count(events, TrainingEvent::Kind::kWarning) == 0) {
    if (!t.Step().ok()) break;
  }
  for (const TrainingEvent& e : events) {
    if (e.kind == TrainingEvent::Kind::kWarning) return e.error;
  }
  return "";
}

// While it waits, Step() does nothing: no step trained, no event, until idle_until.
void ExpectHoldsStill(Trainer& t, const std::vector<TrainingEvent>& events) {
  ASSERT_TRUE(t.idle_until().has_value());
  const int64_t step = t.step();
  const size_t seen = events.size();
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(t.Step().ok());
  if (std::chrono::steady_clock::now() < *t.idle_until()) {
    EXPECT_EQ(t.step(), step);
    EXPECT_EQ(events.size(), seen);
  }
  EXPECT_FALSE(t.done());
}

void RunToTheEnd(Trainer& t) {
  while (!t.done()) {
    if (auto until = t.idle_until()) std::this_thread::sleep_until(*until);
    ASSERT_TRUE(t.Step().ok());
  }
}

class TrainerStorageTest : public TrainerTest {
 protected:
  TrainingJobConfig Blockable(const std::string& sub) const {
    TrainingJobConfig c = Config(sub);
    c.max_steps = 8;
    c.storage_retry_s = 0.3;  // long enough to see it hold still, short for the test
    c.storage_retry_max_s = 0.6;
    return c;
  }
  std::vector<TrainingEvent> Straight(const TrainingJobConfig& config) {
    std::vector<TrainingEvent> events;
    auto t = Trainer::Create(model(), tokenizer(), model_dir(), config,
                             [&events](const TrainingEvent& e) { events.push_back(e); });
    EXPECT_TRUE(t.ok()) << t.status();
    if (t.ok()) {
      EXPECT_TRUE((*t)->Run().ok());
    }
    return events;
  }
  // A trainer for `config` that reports into *events, trained to step `to_step`.
  std::unique_ptr<Trainer> TrainedTo(const TrainingJobConfig& config,
                                     std::vector<TrainingEvent>* events, int64_t to_step) {
    auto t = Trainer::Create(model(), tokenizer(), model_dir(), config,
                             [events](const TrainingEvent& e) { events->push_back(e); });
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return nullptr;
    while ((*t)->step() < to_step) {
      if (!(*t)->Step().ok()) break;
    }
    return *std::move(t);
  }
  // A trainer for `config` that reports into *events, whose write of step `held`'s checkpoint
  // waits for `released` (a minute at most: a trainer that waited for its write would wait that
  // long).
  std::unique_ptr<Trainer> HoldingWriteOf(int64_t held, const TrainingJobConfig& config,
                                          std::vector<TrainingEvent>* events,
                                          std::shared_future<void> released) {
    auto t = Trainer::Create(model(), tokenizer(), model_dir(), config,
                             [events](const TrainingEvent& e) { events->push_back(e); });
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return nullptr;
    (*t)->SetCheckpointWriteGateForTesting([released, held](int64_t step) {
      if (step == held) released.wait_for(std::chrono::seconds(60));
    });
    return *std::move(t);
  }
  // Ended as a run that never waited: no failure, finished, the same losses, the adapter written.
  static void ExpectEndedAsStraight(const std::vector<TrainingEvent>& events,
                                    const std::vector<TrainingEvent>& straight,
                                    const TrainingJobConfig& config) {
    EXPECT_EQ(Count(events, TrainingEvent::Kind::kFailed), 0);
    ASSERT_EQ(events.back().kind, TrainingEvent::Kind::kFinished);
    EXPECT_FALSE(events.back().summary.cancelled);
    EXPECT_EQ(Losses(events), Losses(straight));  // the wait changed nothing trained
    EXPECT_TRUE(fs::exists(fs::path(config.output_dir) / "adapter" / "adapter_model.safetensors"));
  }
};

// A periodic checkpoint is written by a thread of its own: the job trains on (and the GPU loop
// serves) while its files are written and synced, and kCheckpoint comes once they are durable.
TEST_F(TrainerStorageTest, AJobTrainsOnWhileItsPeriodicCheckpointIsWritten) {
  TrainingJobConfig config = Blockable("straight");
  config.save_every = 2;
  config.keep_checkpoints = 0;  // all
  const std::vector<TrainingEvent> straight = Straight(config);

  config.output_dir = (out() / "held").string();
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::vector<TrainingEvent> events;
  auto t = HoldingWriteOf(2, config, &events, released);
  ASSERT_NE(t, nullptr);
  while (t->step() < 3) ASSERT_TRUE(t->Step().ok());
  EXPECT_EQ(Count(events, TrainingEvent::Kind::kCheckpoint), 0);
  EXPECT_FALSE(fs::exists(CheckpointPath(config.output_dir, 2)));
  release.set_value();
  RunToTheEnd(*t);
  ExpectEndedAsStraight(events, straight, config);
  // Reported once durable, after the step trained meanwhile; every checkpoint once, in order.
  std::vector<int64_t> checkpoints;
  size_t step3 = 0, checkpoint2 = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    if (events[i].kind == TrainingEvent::Kind::kStep && events[i].step.step == 3) step3 = i;
    if (events[i].kind != TrainingEvent::Kind::kCheckpoint) continue;
    checkpoints.push_back(events[i].checkpoint.step);
    if (events[i].checkpoint.step == 2) checkpoint2 = i;
  }
  EXPECT_GT(checkpoint2, step3);
  EXPECT_EQ(checkpoints, (std::vector<int64_t>{2, 4, 6, 8}));
  for (int64_t step : checkpoints) {
    EXPECT_TRUE(fs::exists(fs::path(CheckpointPath(config.output_dir, step)) / "optimizer.pt"))
        << step;
  }
}

// The end's checkpoint is written on the checkpoint thread too: until it is durable the job waits
// (idle_until; Step() does no work), so the GPU loop serves, and other jobs train, meanwhile.
TEST_F(TrainerStorageTest, TheEndsCheckpointIsWrittenWhileTheJobWaitsWithoutWork) {
  TrainingJobConfig config = Blockable("straight");
  config.load_best_at_end = true;  // the best adapter goes with the checkpoint, on its thread
  config.eval_every = 4;
  config.data.validation_fraction = 0.25;
  const std::vector<TrainingEvent> straight = Straight(config);

  config.output_dir = (out() / "held-end").string();
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::vector<TrainingEvent> events;
  auto t = HoldingWriteOf(config.max_steps, config, &events, released);
  ASSERT_NE(t, nullptr);
  while (!t->done() && !t->idle_until()) ASSERT_TRUE(t->Step().ok());
  ASSERT_FALSE(t->done()) << "the end's checkpoint was written on the loop";
  EXPECT_EQ(t->step(), config.max_steps);
  ExpectHoldsStill(*t, events);
  EXPECT_FALSE(fs::exists(CheckpointPath(config.output_dir, config.max_steps)));
  release.set_value();
  RunToTheEnd(*t);
  ExpectEndedAsStraight(events, straight, config);
  EXPECT_TRUE(fs::exists(fs::path(CheckpointPath(config.output_dir, config.max_steps)) /
                         "trainer_state.json"));
  EXPECT_TRUE(fs::exists(fs::path(config.output_dir) / "best-adapter" / "adapter_config.json"));
}

TEST_F(TrainerStorageTest, APeriodicCheckpointThatCannotBeWrittenIsRetriedAndNothingIsLost) {
  TrainingJobConfig config = Blockable("straight");
  config.save_every = 4;
  // The write of step 4's fails on its thread; the job hears of it at a Step() after it, by step
  // 8 at the latest (the next checkpoint waits for it), and holds still there.
  config.max_steps = 12;
  config.keep_checkpoints = 0;  // checkpoint-4 stays, to be looked at
  const std::vector<TrainingEvent> straight = Straight(config);

  config.output_dir = (out() / "blocked").string();
  std::vector<TrainingEvent> events;
  auto t = TrainedTo(config, &events, 3);
  ASSERT_NE(t, nullptr);
  BlockedFolder blocked(config.output_dir);
  const std::string warning = StepUntilWarning(*t, events);
  EXPECT_NE(warning.find("the checkpoint of step 4 could not be written"), std::string::npos)
      << warning;
  EXPECT_NE(warning.find("tries again in"), std::string::npos) << warning;
  const int64_t held_at = t->step();
  EXPECT_GE(held_at, 4);
  EXPECT_LE(held_at, 8);
  ExpectHoldsStill(*t, events);
  // Still blocked when the wait is over: tried again, one more warning, still no failure.
  const int warned = Count(events, TrainingEvent::Kind::kWarning);  // 2 if a slow turn retried
  std::this_thread::sleep_until(*t->idle_until());
  EXPECT_TRUE(t->Step().ok());
  EXPECT_EQ(Count(events, TrainingEvent::Kind::kWarning), warned + 1);
  EXPECT_EQ(t->step(), held_at);

  blocked.Unblock();
  RunToTheEnd(*t);
  ExpectEndedAsStraight(events, straight, config);
  EXPECT_EQ(Count(events, TrainingEvent::Kind::kFinished), 1);
  // The retry wrote the state the job held still in.
  EXPECT_TRUE(
      fs::exists(fs::path(CheckpointPath(config.output_dir, held_at)) / "trainer_state.json"))
      << held_at;
}

// A write that fails while the job is in the middle of an optimizer step (it heard of it between
// micro-batches) holds the job at the end of that step, not in it: a shutdown can checkpoint a job
// only between steps (it stepped a job held mid-step for ever), and the step's time would count
// the wait.
TEST_F(TrainerStorageTest, AWriteThatFailsMidStepHoldsTheJobBetweenSteps) {
  TrainingJobConfig config = Blockable("mid-step");
  config.save_every = 2;
  ASSERT_EQ(config.grad_accum, 2);
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::vector<TrainingEvent> events;
  auto t = HoldingWriteOf(2, config, &events, released);
  ASSERT_NE(t, nullptr);
  while (t->step() < 2) ASSERT_TRUE(t->Step().ok());
  ASSERT_TRUE(t->Step().ok());  // step 3's first micro-batch; step 2's write held
  ASSERT_FALSE(t->at_step_boundary());
  BlockedFolder blocked(config.output_dir);
  release.set_value();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the write fails meanwhile
  for (int call = 0; call < 8 && !t->idle_until(); ++call) ASSERT_TRUE(t->Step().ok());
  ASSERT_TRUE(t->idle_until().has_value()) << "the failed write was never heard of";
  EXPECT_TRUE(t->at_step_boundary()) << "held in the middle of step " << t->step() + 1;
  EXPECT_NE(StepUntilWarning(*t, events).find("the checkpoint of step 2 could not be written"),
            std::string::npos);
  blocked.Unblock();
  RunToTheEnd(*t);
  ASSERT_EQ(events.back().kind, TrainingEvent::Kind::kFinished);
  EXPECT_FALSE(events.back().summary.cancelled);
}

TEST_F(TrainerStorageTest, TheEndsCheckpointAndAdapterThatCannotBeWrittenAreRetried) {
  TrainingJobConfig config = Blockable("straight");
  const std::vector<TrainingEvent> straight = Straight(config);

  config.output_dir = (out() / "blocked").string();
  std::vector<TrainingEvent> events;
  auto t = TrainedTo(config, &events, 7);
  ASSERT_NE(t, nullptr);
  BlockedFolder blocked(config.output_dir);
  const std::string warning = StepUntilWarning(*t, events);
  EXPECT_NE(warning.find("the last checkpoint (step 8) could not be written"), std::string::npos)
      << warning;
  ExpectHoldsStill(*t, events);
  blocked.Unblock();
  RunToTheEnd(*t);
  ExpectEndedAsStraight(events, straight, config);
}

// An error waiting cannot fix (here a file where the adapter folder goes, which the writer
// refuses to replace) fails the job as before, rather than keep it running for ever.
TEST_F(TrainerStorageTest, AWriteErrorWaitingCannotFixStillFailsTheJob) {
  TrainingJobConfig config = Blockable("refused");
  config.max_steps = 2;
  fs::create_directories(config.output_dir);
  std::ofstream(fs::path(config.output_dir) / "adapter") << "not an adapter folder";
  std::vector<TrainingEvent> events;
  auto t = TrainedTo(config, &events, config.max_steps);
  ASSERT_NE(t, nullptr);
  while (!t->done() && t->Step().ok()) {  // the end, its writes on their thread
  }
  EXPECT_TRUE(t->done());
  EXPECT_EQ(Count(events, TrainingEvent::Kind::kWarning), 0);
  ASSERT_EQ(events.back().kind, TrainingEvent::Kind::kFailed);
  EXPECT_NE(events.back().error.find("refusing to replace it"), std::string::npos)
      << events.back().error;
}

TEST_F(TrainerStorageTest, ACancelEndsAJobWaitingForStorage) {
  TrainingJobConfig config = Blockable("blocked");
  config.save_every = 4;
  config.max_steps = 12;  // step 4's write is heard of by step 8's checkpoint at the latest
  std::vector<TrainingEvent> events;
  auto t = TrainedTo(config, &events, 3);
  ASSERT_NE(t, nullptr);
  BlockedFolder blocked(config.output_dir);
  const std::string warning = StepUntilWarning(*t, events);
  EXPECT_NE(warning.find("the checkpoint of step 4 could not be written"), std::string::npos)
      << warning;
  t->Cancel();
  EXPECT_FALSE(t->idle_until().has_value());  // the loop steps it at once
  EXPECT_TRUE(t->Step().ok());
  EXPECT_TRUE(t->done());
  ASSERT_EQ(events.back().kind, TrainingEvent::Kind::kFinished);
  EXPECT_TRUE(events.back().summary.cancelled);
  blocked.Unblock();
}

// A merged export that cannot be written (no room for it; here its folder has become a file) is
// not waited for as a checkpoint is: it held the adapter unpublished, and every job queued behind
// it, for as long as the disk stayed full. The job ends with its adapter and says why the merged
// model is missing.
TEST_F(TrainerStorageTest, AMergedExportThatCannotBeWrittenEndsTheJobWithItsAdapter) {
  TrainingJobConfig config = Blockable("export");
  const fs::path slow = SlowExportModel(*this, "slow-model");
  std::vector<TrainingEvent> events;
  auto t = TrainUntilItsFilesAreWritten(*this, slow, &config, &events);
  ASSERT_NE(t, nullptr);
  BlockedFolder blocked(config.output_dir);
  std::thread index_writer([&] { WriteWeightIndex(model_dir(), slow); });  // the export goes on
  for (int turn = 0; !t->done() && turn < 60000; ++turn) {
    ASSERT_TRUE(t->Step().ok());
    if (t->idle_until()) break;  // waiting for room: what it must not do
  }
  index_writer.join();
  blocked.Unblock();
  ASSERT_TRUE(t->done());
  ASSERT_EQ(events.back().kind, TrainingEvent::Kind::kFinished);
  const TrainingSummary& summary = events.back().summary;
  EXPECT_FALSE(summary.cancelled);
  EXPECT_TRUE(summary.merged_path.empty());
  EXPECT_NE(summary.merged_error.find(std::strerror(ENOTDIR)), std::string::npos)
      << summary.merged_error;
  ASSERT_EQ(Count(events, TrainingEvent::Kind::kWarning), 1);
  const std::string warning = events[events.size() - 2].error;
  EXPECT_NE(warning.find("/merged) was not written"), std::string::npos) << warning;
  EXPECT_NE(warning.find("the adapter is published without it"), std::string::npos) << warning;
  EXPECT_TRUE(fs::exists(fs::path(summary.adapter_path) / "adapter_model.safetensors"));
  EXPECT_FALSE(fs::exists(fs::path(config.output_dir) / "merged"));
  EXPECT_FALSE(fs::exists(fs::path(config.output_dir) / "merged.tmp"));
}

// The room check before an export: more than the filesystem has is RESOURCE_EXHAUSTED (a storage
// failure) naming both sizes; what fits passes.
TEST(RequireRoomTest, NamesWhatIsNeededAndWhatIsFree) {
  const std::string folder = fs::temp_directory_path().string();
  const absl::Status refused = RequireRoom(folder, uint64_t{1} << 62, "the merged model");
  ASSERT_TRUE(absl::IsResourceExhausted(refused)) << refused;
  EXPECT_TRUE(IsStorageFailure(refused));
  EXPECT_NE(
      refused.message().find("the merged model needs 4294967296.00 GiB and " + folder + " has "),
      std::string::npos)
      << refused;
  EXPECT_TRUE(absl::EndsWith(refused.message(), " free")) << refused;
  EXPECT_TRUE(RequireRoom(folder, 1, "a byte").ok());
}

}  // namespace
}  // namespace lorad::engine
