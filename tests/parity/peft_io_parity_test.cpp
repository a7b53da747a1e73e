// LoraAdapter against PEFT: adapters PEFT saved read back with the tensors and settings PEFT
// holds, adapters made for other base models are refused by ValidateAgainst, and an adapter
// lorad writes (WritesAdapterForPeft; tests/parity/test_peft_io.py runs it with
// LORAD_PEFT_IO_OUT set and loads the result with PeftModel.from_pretrained) reads back intact.
#include <ATen/CPUGeneratorImpl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "engine/lora/lora_adapter.h"
#include "engine/model/model_config.h"
#include "engine/model/safetensors.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string ReferenceDir() { return std::string(std::getenv("LORAD_PARITY_DIR")) + "/peft_io"; }

ModelConfig TinyModel() {
  auto model = ModelConfig::LoadFromFolder(std::getenv("LORAD_TINY_MODEL"));
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? *model : ModelConfig();
}

nlohmann::json Expected(const std::string& adapter) {
  std::ifstream in(ReferenceDir() + "/expected.json");
  EXPECT_TRUE(in) << "missing reference " << ReferenceDir() << "/expected.json";
  return nlohmann::json::parse(in)[adapter];
}

// The fp32 tensors "<module path>.A" / ".B" the reference read out of PEFT's modules.
std::map<std::string, torch::Tensor> ExpectedTensors(const std::string& file) {
  auto st = SafetensorsFile::Open(ReferenceDir() + "/" + file);
  EXPECT_TRUE(st.ok()) << st.status();
  std::map<std::string, torch::Tensor> out;
  if (!st.ok()) return out;
  for (const auto& v : (*st)->tensors()) {
    torch::Tensor t = torch::empty(v.shape, torch::kFloat32);
    std::memcpy(t.data_ptr(), v.data, v.nbytes);
    out[v.name] = t;
  }
  return out;
}

void ExpectSameAsPeft(const std::string& adapter_name, const std::string& tensors_file) {
  SCOPED_TRACE(adapter_name);
  auto adapter = LoraAdapter::ReadPeft(ReferenceDir() + "/" + adapter_name);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  const auto want = Expected(adapter_name);
  EXPECT_EQ(adapter->config.r, want["r"].get<int>());
  EXPECT_EQ(adapter->config.alpha, want["lora_alpha"].get<double>());
  EXPECT_EQ(adapter->config.dropout, want["lora_dropout"].get<double>());
  EXPECT_EQ(adapter->config.use_rslora, want["use_rslora"].get<bool>());
  EXPECT_DOUBLE_EQ(adapter->config.scaling(), want["scaling"].get<double>());
  EXPECT_EQ(adapter->config.base_model_name_or_path,
            want["base_model_name_or_path"].get<std::string>());
  auto targets = adapter->config.target_modules;
  std::sort(targets.begin(), targets.end());
  EXPECT_EQ(targets, want["target_modules"].get<std::vector<std::string>>());

  const auto tensors = ExpectedTensors(tensors_file);
  ASSERT_EQ(adapter->layers.size(), want["num_layers"].get<size_t>());
  ASSERT_EQ(tensors.size(), 2 * adapter->layers.size());
  for (const auto& [path, pair] : adapter->layers) {
    ASSERT_TRUE(tensors.count(path + ".A")) << path << " is not a layer PEFT adapted";
    EXPECT_EQ(pair.a.scalar_type(), torch::kFloat32);
    EXPECT_TRUE(torch::equal(pair.a, tensors.at(path + ".A"))) << path;
    EXPECT_TRUE(torch::equal(pair.b, tensors.at(path + ".B"))) << path;
  }
  EXPECT_TRUE(adapter->ValidateAgainst(TinyModel()).ok());
}

TEST(PeftIoParity, ReadsPeftAdapterWithIdenticalTensorsAndConfig) {
  ExpectSameAsPeft("adapter", "expected.safetensors");
}

TEST(PeftIoParity, ReadsBf16AdapterAsFp32) {
  ExpectSameAsPeft("adapter_bf16", "expected_bf16.safetensors");
}

TEST(PeftIoParity, ReadsRsLoraAdapterWithPeftScaling) {
  ExpectSameAsPeft("adapter_rslora", "expected_rslora.safetensors");
}

TEST(PeftIoParity, AdapterForAnotherBaseModelIsRefused) {
  const ModelConfig tiny = TinyModel();
  auto wide = LoraAdapter::ReadPeft(ReferenceDir() + "/adapter_hidden64");
  ASSERT_TRUE(wide.ok()) << wide.status();
  auto s = wide->ValidateAgainst(tiny);
  ASSERT_FALSE(s.ok());
  const std::string msg(s.message());
  EXPECT_THAT(msg,
              ::testing::MatchesRegex(
                  ".*adapter tensor base_model\\.model\\.model\\.layers\\.[0-9]+\\..*\\.lora_[AB]"
                  "\\.weight has shape \\[[0-9, ]+\\] but the base model's [a-z_]+ needs "
                  "\\[[0-9, ]+\\].*"));
  EXPECT_THAT(msg, HasSubstr("hidden_size 128"));
  EXPECT_THAT(msg, HasSubstr("different base model"));

  auto deep = LoraAdapter::ReadPeft(ReferenceDir() + "/adapter_3layers");
  ASSERT_TRUE(deep.ok()) << deep.status();
  s = deep->ValidateAgainst(tiny);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("model.layers.2."));
  EXPECT_THAT(std::string(s.message()), HasSubstr("does not exist in the base model"));
}

TEST(PeftIoParity, WritesAdapterForPeft) {
  const char* out_env = std::getenv("LORAD_PEFT_IO_OUT");
  const fs::path out =
      out_env != nullptr ? fs::path(out_env) : fs::path(::testing::TempDir()) / "peft_io_parity";
  const ModelConfig tiny = TinyModel();
  LoraConfig config;
  config.r = 8;
  config.alpha = 16;
  config.dropout = 0.05;
  config.base_model_name_or_path = std::getenv("LORAD_TINY_MODEL");
  auto adapter = LoraAdapter::Init(tiny, config, /*seed=*/1234);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  // Non-zero B, so PEFT loading the wrong tensor (or none: its own init is B = 0) shows.
  at::Generator gen = at::detail::createCPUGenerator(99);
  for (auto& [path, pair] : adapter->layers) pair.b.normal_(0, 0.1, gen);
  const std::string folder = (out / "adapter").string();
  ASSERT_TRUE(adapter->WritePeft(folder).ok());

  auto read = LoraAdapter::ReadPeft(folder);
  ASSERT_TRUE(read.ok()) << read.status();
  ASSERT_EQ(read->layers.size(), adapter->layers.size());
  for (const auto& [path, pair] : adapter->layers) {
    EXPECT_TRUE(torch::equal(read->layers.at(path).a, pair.a)) << path;
    EXPECT_TRUE(torch::equal(read->layers.at(path).b, pair.b)) << path;
  }
}

}  // namespace
}  // namespace lorad::engine
