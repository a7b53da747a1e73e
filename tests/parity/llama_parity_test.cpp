// LlamaModel against transformers, PEFT and bitsandbytes (tests/parity/reference_llama.py): logits
// of a batch of prompts of different lengths, 16 greedy decode steps through the KV cache, a PEFT
// adapter, the NF4 base (quantized at load and read pre-quantized), sharded and bf16 checkpoints,
// Mistral / Qwen2 / Llama 3 rope scaling with tied embeddings, and LoRA gradients.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <string>

#include "engine/lora/lora_adapter.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_weights.h"
#include "engine/model/safetensors.h"
#include "engine/train/trainer.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

using nlohmann::json;

constexpr double kTolerance = 1e-4;

std::string Dir() { return std::string(std::getenv("LORAD_PARITY_DIR")) + "/llama/"; }

json Cases() {
  std::ifstream in(Dir() + "cases.json");
  EXPECT_TRUE(in) << "missing reference " << Dir() << "cases.json";
  return in ? json::parse(in) : json::object();
}

// Every tensor of a reference file, copied out of the mapping.
std::map<std::string, torch::Tensor> References(const std::string& name) {
  auto f = SafetensorsFile::Open(Dir() + name + ".safetensors");
  EXPECT_TRUE(f.ok()) << f.status();
  std::map<std::string, torch::Tensor> out;
  if (!f.ok()) return out;
  for (const TensorView& v : (*f)->tensors()) {
    torch::Tensor t = torch::empty(v.shape, TorchDType(v.dtype));
    if (v.nbytes > 0) std::memcpy(t.data_ptr(), v.data, v.nbytes);
    out[v.name] = t;
  }
  return out;
}

// Infinity when either side holds a NaN or an infinity: callers keep the worst difference with
// std::max, which drops a NaN (it compares false), and a model that output only NaNs passed.
double MaxAbsDiff(const torch::Tensor& a, const torch::Tensor& b) {
  EXPECT_EQ(a.sizes(), b.sizes());
  if (a.sizes() != b.sizes()) return 1e30;
  const torch::Tensor x = a.to(torch::kDouble), y = b.to(torch::kDouble);
  if (!torch::isfinite(x).all().item<bool>() || !torch::isfinite(y).all().item<bool>()) {
    return std::numeric_limits<double>::infinity();
  }
  return (x - y).abs().max().item<double>();
}

std::unique_ptr<LlamaModel> LoadModel(const json& c) {
  LlamaModelOptions options;
  auto base = BaseWeightsFromName(c["base"].get<std::string>());
  EXPECT_TRUE(base.ok()) << base.status();
  options.base = *base;
  auto model = LlamaModel::Load(c["model"].get<std::string>(), options);
  EXPECT_TRUE(model.ok()) << c["name"] << ": " << model.status();
  return model.ok() ? *std::move(model) : nullptr;
}

std::optional<LoraAdapter> LoadAdapter(const json& c) {
  if (c["adapter"].is_null()) return std::nullopt;
  auto adapter = LoraAdapter::ReadPeft(c["adapter"].get<std::string>());
  EXPECT_TRUE(adapter.ok()) << adapter.status();
  if (!adapter.ok()) return std::nullopt;
  return *std::move(adapter);
}

std::vector<std::vector<int64_t>> PromptsOf(const json& cases, const json& c) {
  const json& p = c.contains("prompts") ? c["prompts"] : cases["prompts"];
  return p.get<std::vector<std::vector<int64_t>>>();
}

// The prompts right-padded (with token 0) into one batch.
ForwardBatch Batch(const std::vector<std::vector<int64_t>>& prompts) {
  int64_t width = 0;
  for (const auto& p : prompts) width = std::max<int64_t>(width, p.size());
  ForwardBatch batch;
  batch.input_ids = torch::zeros({static_cast<int64_t>(prompts.size()), width}, torch::kLong);
  for (size_t i = 0; i < prompts.size(); ++i) {
    for (size_t t = 0; t < prompts[i].size(); ++t) {
      batch.input_ids[i][t] = prompts[i][t];
    }
    batch.lengths.push_back(static_cast<int64_t>(prompts[i].size()));
  }
  return batch;
}

TEST(LlamaParity, BatchedPrefillLogitsMatchTransformers) {
  const json cases = Cases();
  ASSERT_TRUE(cases.contains("cases"));
  for (const json& c : cases["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    auto model = LoadModel(c);
    ASSERT_NE(model, nullptr);
    const auto adapter = LoadAdapter(c);
    const auto prompts = PromptsOf(cases, c);
    ForwardOptions options;
    options.adapter = adapter ? &*adapter : nullptr;
    auto logits = model->Forward(Batch(prompts), nullptr, options);
    ASSERT_TRUE(logits.ok()) << logits.status();
    const auto refs = References(c["reference"].get<std::string>());
    double worst = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      const torch::Tensor got = (*logits)[i].narrow(0, 0, prompts[i].size());
      worst = std::max(worst, MaxAbsDiff(got, refs.at("prompt." + std::to_string(i))));
    }
    EXPECT_LE(worst, kTolerance);
    std::cout << "[llama parity] " << c["name"].get<std::string>()
              << " prefill max abs diff: " << worst << "\n";
  }
}

// Prefill the prompts into a KV cache as one padded batch, then feed transformers' 16 greedy
// tokens one step at a time: every step's logits equal transformers' for the full sequence, and
// lorad's greedy choice is transformers' token.
TEST(LlamaParity, GreedyDecodeWithKvCacheMatchesTransformers) {
  const json cases = Cases();
  const int64_t steps = cases.value("decode_steps", 0);
  ASSERT_GT(steps, 0);
  int decoded_cases = 0;
  for (const json& c : cases["cases"]) {
    if (!c["decode"].get<bool>()) continue;
    ++decoded_cases;
    SCOPED_TRACE(c["name"].get<std::string>());
    auto model = LoadModel(c);
    ASSERT_NE(model, nullptr);
    const auto adapter = LoadAdapter(c);
    const auto prompts = PromptsOf(cases, c);
    const auto refs = References(c["reference"].get<std::string>());
    const int64_t rows = static_cast<int64_t>(prompts.size());
    int64_t longest = 0;
    for (const auto& p : prompts) longest = std::max<int64_t>(longest, p.size());
    auto cache = model->NewCache(rows, longest + steps);
    ASSERT_TRUE(cache.ok()) << cache.status();

    ForwardOptions options;
    options.adapter = adapter ? &*adapter : nullptr;
    auto prefill = model->Forward(Batch(prompts), cache->get(), options);
    ASSERT_TRUE(prefill.ok()) << prefill.status();
    double worst = 0;
    std::vector<torch::Tensor> last(rows);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t n = static_cast<int64_t>(prompts[i].size());
      const torch::Tensor& ref = refs.at("sequence_logits." + std::to_string(i));
      worst = std::max(worst, MaxAbsDiff((*prefill)[i].narrow(0, 0, n), ref.narrow(0, 0, n)));
      last[i] = (*prefill)[i][n - 1];
    }
    options.logits = LogitsMode::kLast;
    for (int64_t s = 0; s < steps; ++s) {
      ForwardBatch step;
      step.input_ids = torch::zeros({rows, 1}, torch::kLong);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t n = static_cast<int64_t>(prompts[i].size());
        const torch::Tensor& seq = refs.at("sequence." + std::to_string(i));
        const int64_t token = seq[n + s].item<int64_t>();
        EXPECT_EQ(last[i].argmax().item<int64_t>(), token) << "row " << i << " step " << s;
        step.input_ids[i][0] = token;
      }
      auto logits = model->Forward(step, cache->get(), options);
      ASSERT_TRUE(logits.ok()) << logits.status();
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t n = static_cast<int64_t>(prompts[i].size());
        const torch::Tensor& ref = refs.at("sequence_logits." + std::to_string(i));
        worst = std::max(worst, MaxAbsDiff((*logits)[i], ref[n + s]));
        last[i] = (*logits)[i];
      }
    }
    EXPECT_LE(worst, kTolerance);
    std::cout << "[llama parity] " << c["name"].get<std::string>() << " prefill + " << steps
              << " cached decode steps max abs diff: " << worst << "\n";
  }
  EXPECT_GE(decoded_cases, 6);
}

TEST(LlamaParity, ShardedCheckpointGivesTheSameLogitsAsOneFile) {
  const json cases = Cases();
  std::map<std::string, json> by_name;
  for (const json& c : cases["cases"]) by_name[c["name"].get<std::string>()] = c;
  ASSERT_TRUE(by_name.count("sharded") && by_name.count("fixture"));
  ASSERT_TRUE(ModelWeights::Open(by_name["sharded"]["model"].get<std::string>())
                  ->Contains("lm_head.weight"));
  auto single = LoadModel(by_name["fixture"]);
  auto sharded = LoadModel(by_name["sharded"]);
  ASSERT_TRUE(single && sharded);
  const ForwardBatch batch = Batch(PromptsOf(cases, by_name["fixture"]));
  auto a = single->Forward(batch, nullptr, {});
  auto b = sharded->Forward(batch, nullptr, {});
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(torch::equal(*a, *b));
}

// loss.backward() through the training forward: the loss and every LoRA gradient equal PEFT's;
// the base gets no gradient. Also for rows of packed examples kept apart (position_ids).
// A folder quantized by bitsandbytes has no 16-bit base to merge an adapter into: a job asking
// for a merged export is refused before it trains (it trained to its end, then failed there).
TEST(LlamaParity, AMergedExportOfABitsandbytesCheckpointIsRefusedBeforeTraining) {
  const std::string bnb_folder = Dir() + "tiny_bnb_nf4";
  auto bnb = LlamaModel::Load(bnb_folder, LlamaModelOptions());
  ASSERT_TRUE(bnb.ok()) << bnb.status();
  EXPECT_TRUE((*bnb)->bitsandbytes_checkpoint());
  auto float_model = LlamaModel::Load(std::getenv("LORAD_TINY_MODEL"), LlamaModelOptions());
  ASSERT_TRUE(float_model.ok()) << float_model.status();
  EXPECT_FALSE((*float_model)->bitsandbytes_checkpoint());
  TrainingJobConfig config;
  config.export_merged_dtype = "bf16";
  const absl::Status refused = Trainer::CheckMergedExport(**bnb, bnb_folder, config);
  EXPECT_TRUE(absl::IsInvalidArgument(refused)) << refused;
  EXPECT_NE(refused.message().find("export_merged"), std::string::npos) << refused;
  EXPECT_TRUE(Trainer::CheckMergedExport(**float_model, "tiny", config).ok());
  // Also one whose first layer's attention is 16-bit (the flag looked at that projection alone).
  const std::string partly_folder = Dir() + "tiny_bnb_nf4_skip_modules";
  auto partly = LlamaModel::Load(partly_folder, LlamaModelOptions());
  ASSERT_TRUE(partly.ok()) << partly.status();
  EXPECT_TRUE((*partly)->bitsandbytes_checkpoint());
  EXPECT_TRUE(absl::IsInvalidArgument(Trainer::CheckMergedExport(**partly, partly_folder, config)));
  config.export_merged_dtype.clear();
  EXPECT_TRUE(Trainer::CheckMergedExport(**bnb, bnb_folder, config).ok());
}

TEST(LlamaParity, LoraGradientsMatchPeft) {
  const json cases = Cases();
  ASSERT_TRUE(cases.contains("train") && !cases["train"].empty());
  for (const json& c : cases["train"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    auto model = LoadModel(c);
    ASSERT_NE(model, nullptr);
    auto adapter = LoadAdapter(c);
    ASSERT_TRUE(adapter);
    for (auto& [path, pair] : adapter->layers) {
      pair.a.requires_grad_(true);
      pair.b.requires_grad_(true);
    }
    const auto refs = References(c["name"].get<std::string>());
    ForwardBatch batch;
    batch.input_ids = refs.at("input_ids");
    const torch::Tensor lengths = refs.at("lengths");
    for (int64_t i = 0; i < lengths.size(0); ++i) {
      batch.lengths.push_back(lengths[i].item<int64_t>());
    }
    // Packed examples kept apart: transformers attends within each run of positions.
    if (refs.count("position_ids") > 0) batch.positions = refs.at("position_ids");
    ForwardOptions options;
    options.adapter = &*adapter;
    options.train = true;
    // The packed case also runs checkpointed, as the trainer runs it.
    options.checkpoint_layers = refs.count("position_ids") > 0;
    auto loss = model->Loss(batch, refs.at("labels"), options);
    ASSERT_TRUE(loss.ok()) << loss.status();
    EXPECT_NEAR(loss->item<double>(), refs.at("loss").item<double>(), kTolerance);
    loss->backward();

    double worst_relative = 0;
    int compared = 0;
    for (const auto& [path, pair] : adapter->layers) {
      for (const auto& [factor, tensor] : {std::pair{"A", pair.a}, std::pair{"B", pair.b}}) {
        const std::string key = path + ".lora_" + factor;
        ASSERT_TRUE(tensor.grad().defined()) << key << " got no gradient";
        const torch::Tensor& want = refs.at(key);
        const double scale = std::max(want.abs().max().item<double>(), 1e-12);
        worst_relative = std::max(worst_relative, MaxAbsDiff(tensor.grad(), want) / scale);
        ++compared;
      }
    }
    EXPECT_EQ(compared, 2 * 7 * model->config().num_hidden_layers);
    EXPECT_LE(worst_relative, kTolerance);
    for (const torch::Tensor& t : model->base_tensors()) {
      EXPECT_FALSE(t.requires_grad());
      EXPECT_FALSE(t.grad().defined());
    }
    std::cout << "[llama parity] " << c["name"].get<std::string>()
              << " LoRA gradients max relative diff: " << worst_relative << "\n";
  }
}

}  // namespace
}  // namespace lorad::engine
