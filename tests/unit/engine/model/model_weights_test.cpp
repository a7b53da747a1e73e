// ModelWeights: single-file and sharded checkpoints, zero-copy views, dtype conversion, and the
// errors a broken or mismatched checkpoint gives.
#include "engine/model/model_weights.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;

std::string TinyModel() { return std::getenv("LORAD_TINY_MODEL"); }

class ModelWeightsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("lorad_model_weights_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  void WriteText(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name) << text;
  }
  // Writes `tensors` (name -> float32 CPU tensor, stored as `dtype`) to dir_/file.
  void WriteTensors(const std::string& file, const std::map<std::string, torch::Tensor>& tensors,
                    DType dtype) {
    std::vector<torch::Tensor> keep;
    std::vector<TensorView> views;
    for (const auto& [name, t] : tensors) {
      keep.push_back(t.to(TorchDType(dtype)).contiguous());
      TensorView v;
      v.name = name;
      v.dtype = dtype;
      v.shape = keep.back().sizes().vec();
      v.data = static_cast<const uint8_t*>(keep.back().data_ptr());
      v.nbytes = keep.back().nbytes();
      views.push_back(v);
    }
    ASSERT_TRUE(WriteSafetensors((dir_ / file).string(), views).ok());
  }

  fs::path dir_;
};

TEST_F(ModelWeightsTest, FixtureTensorsAreZeroCopyViewsOfTheFile) {
  auto w = ModelWeights::Open(TinyModel());
  ASSERT_TRUE(w.ok()) << w.status();
  const TensorView* view = w->Find("model.embed_tokens.weight");
  ASSERT_NE(view, nullptr);
  auto t = w->Get("model.embed_tokens.weight", torch::kFloat, torch::kCPU,
                  std::vector<int64_t>{512, 128});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->data_ptr(), static_cast<const void*>(view->data));
  // The view outlives the ModelWeights that made it: it holds the mapping.
  torch::Tensor kept = *t;
  const float first = kept[0][0].item<float>();
  w = absl::NotFoundError("dropped");
  EXPECT_EQ(kept[0][0].item<float>(), first);
}

TEST_F(ModelWeightsTest, Bf16CheckpointConvertsToTheComputeDtype) {
  const torch::Tensor values = torch::tensor({1.5f, -2.25f, 0.125f, 3.0f}).view({2, 2});
  WriteTensors("model.safetensors", {{"w", values}}, DType::kBF16);
  auto w = ModelWeights::Open(dir_.string());
  ASSERT_TRUE(w.ok()) << w.status();
  auto t = w->Get("w", torch::kFloat, torch::kCPU, std::vector<int64_t>{2, 2});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::equal(*t, values));  // these values are exact in bf16
}

TEST_F(ModelWeightsTest, MissingTensorErrorNamesTensorAndFolder) {
  WriteTensors("model.safetensors", {{"a", torch::ones({2})}}, DType::kF32);
  auto w = ModelWeights::Open(dir_.string());
  ASSERT_TRUE(w.ok());
  auto t = w->Get("model.norm.weight", torch::kFloat, torch::kCPU);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("model.norm.weight"), std::string::npos);
  EXPECT_NE(t.status().message().find(dir_.string()), std::string::npos);
}

TEST_F(ModelWeightsTest, WrongShapeErrorNamesBothShapes) {
  WriteTensors("model.safetensors", {{"a", torch::ones({3, 4})}}, DType::kF32);
  auto w = ModelWeights::Open(dir_.string());
  ASSERT_TRUE(w.ok());
  auto t = w->Get("a", torch::kFloat, torch::kCPU, std::vector<int64_t>{4, 3});
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("[3, 4]"), std::string::npos) << t.status();
  EXPECT_NE(t.status().message().find("[4, 3]"), std::string::npos) << t.status();
}

TEST_F(ModelWeightsTest, IntegerTensorIsNotSilentlyCastToFloat) {
  WriteTensors("model.safetensors", {{"a", torch::ones({4})}}, DType::kI32);
  auto w = ModelWeights::Open(dir_.string());
  ASSERT_TRUE(w.ok());
  auto t = w->Get("a", torch::kFloat, torch::kCPU);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("I32"), std::string::npos) << t.status();
}

TEST_F(ModelWeightsTest, ShardedCheckpointReadsEveryShard) {
  WriteTensors("model-00001-of-00002.safetensors", {{"a", torch::ones({2})}}, DType::kF32);
  WriteTensors("model-00002-of-00002.safetensors", {{"b", torch::zeros({3})}}, DType::kF32);
  WriteText("model.safetensors.index.json",
            R"({"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors"}})");
  auto w = ModelWeights::Open(dir_.string());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->names(), (std::vector<std::string>{"a", "b"}));
  auto b = w->Get("b", torch::kFloat, torch::kCPU, std::vector<int64_t>{3});
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->sum().item<float>(), 0.f);
}

TEST_F(ModelWeightsTest, IndexNamingAMissingShardIsAnError) {
  WriteTensors("model-00001-of-00002.safetensors", {{"a", torch::ones({2})}}, DType::kF32);
  WriteText("model.safetensors.index.json",
            R"({"weight_map": {"a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors"}})");
  auto w = ModelWeights::Open(dir_.string());
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("model-00002-of-00002.safetensors"), std::string::npos);
  EXPECT_NE(w.status().message().find("'b'"), std::string::npos) << w.status();
}

// An index that drifted from its shards loads as transformers loads it: an entry no shard holds
// (a tied lm_head listed but never saved) is passed over, and a tensor a shard holds that the
// index leaves out is read; a needed tensor no shard holds is an error when it is read.
TEST_F(ModelWeightsTest, AnIndexThatDriftedFromItsShardsLoadsAsTransformersLoadsIt) {
  WriteTensors("model-00001-of-00001.safetensors",
               {{"a", torch::ones({2})}, {"model.norm.weight", torch::zeros({3})}}, DType::kF32);
  WriteText("model.safetensors.index.json",
            R"({"weight_map": {"a": "model-00001-of-00001.safetensors",
                "lm_head.weight": "model-00001-of-00001.safetensors"}})");
  auto w = ModelWeights::Open(dir_.string());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->names(), (std::vector<std::string>{"a", "model.norm.weight"}));
  EXPECT_TRUE(
      w->Get("model.norm.weight", torch::kFloat, torch::kCPU, std::vector<int64_t>{3}).ok());
  auto head = w->Get("lm_head.weight", torch::kFloat, torch::kCPU);
  ASSERT_FALSE(head.ok());
  EXPECT_NE(head.status().message().find("lm_head.weight"), std::string::npos) << head.status();
}

TEST_F(ModelWeightsTest, IndexShardOutsideTheFolderIsRefused) {
  WriteText("model.safetensors.index.json", R"({"weight_map": {"a": "../../etc/passwd"}})");
  auto w = ModelWeights::Open(dir_.string());
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("not a file name"), std::string::npos) << w.status();
}

TEST_F(ModelWeightsTest, FolderWithoutCheckpointSaysWhatIsExpected) {
  auto w = ModelWeights::Open(dir_.string());
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("model.safetensors"), std::string::npos);
  EXPECT_FALSE(ModelWeights::Open((dir_ / "nope").string()).ok());
}

}  // namespace
}  // namespace lorad::engine
