#include "engine/train/checkpoint_folders.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>

#include "engine/lora/lora_adapter.h"
#include "engine/runtime/random_state.h"
#include "engine/train/optimizer.h"
#include "engine/train/training_checkpoint.h"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;

class CheckpointFoldersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) / ("checkpoint_folders_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  // A checkpoint folder holding every file a resume reads, less `missing`.
  void Make(int64_t step, const std::string& missing = "") {
    const fs::path folder = CheckpointPath(dir_.string(), step);
    for (const std::string& file : CheckpointFiles()) {
      if (file == missing) continue;
      fs::create_directories((folder / file).parent_path());
      std::ofstream(folder / file) << "x";
    }
  }
  fs::path dir_;
};

// A kill during a delete can leave part of a folder: the newest complete one is the resume point.
TEST_F(CheckpointFoldersTest, AFolderMissingAnyFileIsNotComplete) {
  Make(5);
  Make(10, "optimizer.pt");
  Make(15, "adapter/adapter_model.safetensors");
  EXPECT_EQ(LatestCheckpoint(dir_.string()), CheckpointPath(dir_.string(), 5));
  Make(20);
  EXPECT_EQ(LatestCheckpoint(dir_.string()), CheckpointPath(dir_.string(), 20));
  EXPECT_EQ(CompleteCheckpoints(dir_.string()).size(), 2u);
}

TEST_F(CheckpointFoldersTest, RemovedFoldersLeaveNoPartUnderTheirNameAndLeftoversGo) {
  Make(5);
  RemoveFolder(CheckpointPath(dir_.string(), 5));
  EXPECT_FALSE(fs::exists(CheckpointPath(dir_.string(), 5)));
  EXPECT_TRUE(fs::is_empty(dir_));
  fs::create_directories(dir_ / ".checkpoint-7.tmp" / "adapter");
  fs::create_directories(dir_ / ".deleting-checkpoint-3");
  fs::create_directories(dir_ / "adapter");  // the job's own output stays
  // The end's files, killed mid-write (names as their writers make them).
  for (const char* leftover : {".adapter.tmp-Ab12Cd", ".best-adapter.tmp-Zz9Yy8", "merged.tmp"}) {
    fs::create_directories(dir_ / leftover);
    std::ofstream(dir_ / leftover / "adapter_config.json") << "{}";
  }
  std::ofstream(dir_ / "eval_report.json.tmp") << "{";
  std::ofstream(dir_ / "eval_report.json") << "{}";
  RemoveLeftovers(dir_.string());
  EXPECT_FALSE(fs::exists(dir_ / ".checkpoint-7.tmp"));
  EXPECT_FALSE(fs::exists(dir_ / ".deleting-checkpoint-3"));
  for (const char* leftover :
       {".adapter.tmp-Ab12Cd", ".best-adapter.tmp-Zz9Yy8", "merged.tmp", "eval_report.json.tmp"}) {
    EXPECT_FALSE(fs::exists(dir_ / leftover)) << leftover;
  }
  EXPECT_TRUE(fs::exists(dir_ / "adapter"));
  EXPECT_TRUE(fs::exists(dir_ / "eval_report.json"));
}

// Replacing a folder where the filesystem cannot swap two (NFS, CIFS) moves the old one aside,
// then renames the new one in: killed between the two, the old one is the only whole copy, and
// goes back (both were removed, and a job killed during its end retrained from its first step).
// Where the new one took its name, the old one goes.
TEST_F(CheckpointFoldersTest, AFolderMovedAsideByAnInterruptedReplaceGoesBack) {
  Make(8);
  fs::rename(CheckpointPath(dir_.string(), 8), dir_ / ".replaced-checkpoint-8");
  fs::create_directories(dir_ / ".checkpoint-8.tmp" / "adapter");
  fs::create_directories(dir_ / ".replaced-adapter");
  std::ofstream(dir_ / ".replaced-adapter" / "adapter_config.json") << "{}";
  fs::create_directories(dir_ / ".replaced-merged");  // replaced: merged/ is the new one
  fs::create_directories(dir_ / "merged");
  RemoveLeftovers(dir_.string());
  EXPECT_EQ(LatestCheckpoint(dir_.string()), CheckpointPath(dir_.string(), 8));
  EXPECT_TRUE(fs::exists(dir_ / "adapter" / "adapter_config.json"));
  EXPECT_TRUE(fs::exists(dir_ / "merged"));
  for (const char* gone :
       {".replaced-checkpoint-8", ".checkpoint-8.tmp", ".replaced-adapter", ".replaced-merged"}) {
    EXPECT_FALSE(fs::exists(dir_ / gone)) << gone;
  }
}

// Non-finite values in the trainer's state (the loss sum of a job resumed from an older lorad's
// checkpoint starts at NaN; an evaluation can overflow) come back as they were: JSON has no NaN,
// they were written as null and read as "malformed", so no later checkpoint could be resumed.
TEST_F(CheckpointFoldersTest, ACheckpointWithNonFiniteValuesIsReadBackAsItWasWritten) {
  auto model = ModelConfig::LoadFromFolder(std::getenv("LORAD_TINY_MODEL"));
  ASSERT_TRUE(model.ok()) << model.status();
  LoraConfig lora;
  lora.r = 2;
  lora.target_modules = {"q_proj"};
  auto adapter = LoraAdapter::Init(*model, lora, 1);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  std::vector<torch::Tensor> params;
  for (auto& [path, pair] : adapter->layers) params.insert(params.end(), {pair.a, pair.b});
  auto optimizer = MakeOptimizer(OptimizerKind::kAdamW, params);
  ASSERT_TRUE(optimizer.ok()) << optimizer.status();
  TrainerState state;
  state.step = 3;
  state.loss_sum = std::numeric_limits<double>::quiet_NaN();
  state.best_eval_loss = std::numeric_limits<double>::infinity();
  state.best_train_loss = -std::numeric_limits<double>::infinity();
  state.last_loss = 1.5;
  auto folder = WriteCheckpoint(dir_.string(), *adapter, (*optimizer)->SaveState(),
                                RandomState::Capture(false), state);
  ASSERT_TRUE(folder.ok()) << folder.status();
  auto read = ReadCheckpoint(*folder);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(std::isnan(read->state.loss_sum));
  EXPECT_EQ(read->state.best_eval_loss, std::numeric_limits<double>::infinity());
  EXPECT_EQ(read->state.best_train_loss, -std::numeric_limits<double>::infinity());
  EXPECT_EQ(read->state.last_loss, 1.5);
  EXPECT_EQ(read->state.step, 3);
}

}  // namespace
}  // namespace lorad::engine
