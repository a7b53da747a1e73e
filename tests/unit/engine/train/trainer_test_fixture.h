// TrainerTest: the fixture of the trainer's tests (trainer_test.cpp, trainer_stop_test.cpp): the
// tiny fixture model and its tokenizer, a job on the Q&A fixture file, an output folder per test.
#pragma once

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/model/llama_model.h"
#include "engine/model/model_weights.h"
#include "engine/model/tokenizer.h"
#include "engine/train/trainer.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {

namespace fs = std::filesystem;

class TrainerTest : public ::testing::Test {
 public:
  // For helpers outside the tests.
  const LlamaModel& model() const { return *model_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const std::string& model_dir() const { return model_dir_; }
  const fs::path& out() const { return out_; }

 protected:
  void SetUp() override {
    model_dir_ = std::getenv("LORAD_TINY_MODEL");
    auto model = LlamaModel::Load(model_dir_, {});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);
    auto tokenizer = LoadTokenizer(model_dir_);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = *std::move(tokenizer);
    out_ = fs::temp_directory_path() /
           ("lorad_trainer_test_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(out_);
  }
  void TearDown() override { fs::remove_all(out_); }

  TrainingJobConfig Config(const std::string& sub) const {
    TrainingJobConfig c;
    c.data.path = std::string(LORAD_SOURCE_DIR) + "/tests/fixtures/qa_small.jsonl";
    c.lora.r = 8;
    c.max_steps = 20;
    c.micro_batch_size = 2;
    c.grad_accum = 2;
    c.learning_rate = 5e-3;
    c.warmup_steps = 2;
    c.optimizer = "adamw";
    c.max_seq_length = 256;
    c.seed = 11;
    c.output_dir = (out_ / sub).string();
    return c;
  }

  // A job of two one-micro-batch steps validated on 4 rows (one a Step() call), without cadence
  // checkpoints (its config in *config, its events into *events), trained to its last step and
  // one validation row into its last evaluation; null (a test failure) if it could not be.
  std::unique_ptr<Trainer> InItsLastEvaluation(const std::string& sub, TrainingJobConfig* config,
                                               std::vector<TrainingEvent>* events) const {
    *config = Config(sub);
    config->data.validation_fraction = 0.25;
    config->micro_batch_size = 1;
    config->grad_accum = 1;
    config->max_steps = 2;
    config->save_every = 0;
    auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, *config,
                             [events](const TrainingEvent& e) { events->push_back(e); });
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return nullptr;
    while ((*t)->step() < 2) {
      if (!(*t)->Step().ok()) return nullptr;
    }
    if (!(*t)->Step().ok()) return nullptr;  // the last evaluation's first validation row
    return *std::move(t);
  }

  // A copy of the tiny model in out_/name whose tokenizer_config.json `edit` changes.
  fs::path ModelWithTokenizerConfig(const std::string& name,
                                    const std::function<void(nlohmann::json&)>& edit) const {
    const fs::path folder = out_ / name;
    fs::create_directories(folder);
    for (const auto& f : fs::directory_iterator(model_dir_)) {
      fs::copy(f.path(), folder / f.path().filename());
    }
    nlohmann::json tc = nlohmann::json::parse(std::ifstream(folder / "tokenizer_config.json"));
    edit(tc);
    std::ofstream(folder / "tokenizer_config.json") << tc.dump();
    return folder;
  }

  // Evaluated every 2 steps on a quarter of the file, with a learning rate that diverges: the
  // validation loss stops improving and early stopping (patience 1) ends the job.
  TrainingJobConfig StoppingEarlyConfig(const std::string& sub) const {
    TrainingJobConfig c = Config(sub);
    c.data.validation_fraction = 0.25;
    c.eval_every = 2;
    c.early_stopping_patience = 1;
    c.learning_rate = 0.5;
    c.max_steps = 40;
    return c;
  }

  std::string model_dir_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  fs::path out_;
};

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

inline std::vector<double> Losses(const std::vector<TrainingEvent>& events) {
  std::vector<double> out;
  for (const auto& e : events) {
    if (e.kind == TrainingEvent::Kind::kStep && !e.replayed) out.push_back(e.step.loss);
  }
  return out;
}

inline std::vector<int64_t> EvalSteps(const std::vector<TrainingEvent>& events) {
  std::vector<int64_t> out;
  for (const auto& e : events) {
    if (e.kind == TrainingEvent::Kind::kEval && !e.replayed) out.push_back(e.eval.step);
  }
  return out;
}

// A copy of the model folder whose weight index is a FIFO: a merged export waits on it until
// WriteWeightIndex writes it (the job's files are written by then).
inline fs::path SlowExportModel(const TrainerTest& test, const std::string& name) {
  const fs::path slow = test.out() / name;
  fs::create_directories(slow);
  for (const auto& f : fs::directory_iterator(test.model_dir())) {
    if (f.path().filename() != "model.safetensors") fs::copy(f.path(), slow / f.path().filename());
  }
  fs::create_symlink(fs::path(test.model_dir()) / "model.safetensors",
                     slow / "weights.safetensors");
  EXPECT_EQ(mkfifo((slow / "model.safetensors.index.json").c_str(), 0644), 0);
  return slow;
}

inline void WriteWeightIndex(const std::string& model_dir, const fs::path& slow) {
  auto weights = ModelWeights::Open(model_dir);
  ASSERT_TRUE(weights.ok()) << weights.status();
  nlohmann::json index;
  for (const auto& name : weights->names()) index["weight_map"][name] = "weights.safetensors";
  std::ofstream(slow / "model.safetensors.index.json") << index.dump();
}

// `config` as a 2-step job on `slow` (SlowExportModel) exporting a merged model, stepped until its
// adapter is written: its export then waits on the model's index.
inline std::unique_ptr<Trainer> TrainUntilItsFilesAreWritten(const TrainerTest& test,
                                                             const fs::path& slow,
                                                             TrainingJobConfig* config,
                                                             std::vector<TrainingEvent>* events) {
  config->max_steps = 2;
  config->export_merged_dtype = "float32";
  auto t = Trainer::Create(test.model(), test.tokenizer(), slow.string(), *config,
                           [events](const TrainingEvent& e) { events->push_back(e); });
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok()) return nullptr;
  const fs::path adapter = fs::path(config->output_dir) / "adapter" / "adapter_model.safetensors";
  // Written on a thread of its own (the job waits meanwhile: idle_until); the export starts at
  // the Step() after, which hears it is done.
  while (!fs::exists(adapter) || (*t)->idle_until()) {
    if (!(*t)->Step().ok()) return nullptr;
  }
  if (!(*t)->Step().ok()) return nullptr;
  EXPECT_FALSE((*t)->done()) << "the export cannot have finished: its index is not written";
  return *std::move(t);
}

}  // namespace lorad::engine
