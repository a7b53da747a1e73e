// The InferenceEngine tests' fixture (inference_engine_test.cpp, inference_engine_ending_test.cpp):
// the tiny model, its tokenizer and an adapter store, engines on them, and the requests and
// results the tests compare.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "engine/infer/inference_engine.h"
#include "engine/lora/adapter_store.h"
#include "engine/lora/lora_adapter.h"
#include "engine/model/llama_model.h"
#include "engine/model/tokenizer.h"

namespace lorad::engine::test_fixtures {

struct Result {
  std::vector<int32_t> tokens;
  std::string text;
  FinishReason reason = FinishReason::kNone;
  absl::Status status;
  GenerationUsage usage;
  int events = 0;
  int finished_events = 0;
};

class Fixture {
 public:
  explicit Fixture(const AdapterStoreOptions& store_options = AdapterStoreOptions()) {
    const char* folder = std::getenv("LORAD_TINY_MODEL");
    auto model = LlamaModel::Load(folder, LlamaModelOptions());
    EXPECT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);
    auto tokenizer = LoadTokenizer(folder);
    EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = *std::move(tokenizer);
    auto store = AdapterStore::Create(model_->config(), store_options);
    EXPECT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
  }

  // A random adapter (non-zero B) published under `name`; returns its version.
  int64_t Publish(const std::string& name, int r, uint64_t seed) {
    LoraConfig config;
    config.r = r;
    config.alpha = 2.0 * r;
    auto adapter = LoraAdapter::Init(model_->config(), config, seed);
    EXPECT_TRUE(adapter.ok()) << adapter.status();
    torch::manual_seed(seed);
    for (auto& [path, pair] : adapter->layers) pair.b = 0.2 * torch::randn_like(pair.b);
    auto version = store_->Publish(name, *adapter, "test");
    EXPECT_TRUE(version.ok()) << version.status();
    return version.ok() ? *version : 0;
  }

  static InferenceEngineOptions Small() {
    InferenceEngineOptions o;
    o.kv_cache_bytes = 16 << 20;  // 1024 blocks of 16 tokens for the fixture: plenty
    return o;
  }

  // On the fixture's tokenizer, or `tokenizer` (which must outlive the engine).
  std::unique_ptr<InferenceEngine> Engine(InferenceEngineOptions options = Small(),
                                          const Tokenizer* tokenizer = nullptr) {
    auto engine = InferenceEngine::Create(
        model_.get(), tokenizer != nullptr ? tokenizer : tokenizer_.get(), store_.get(), options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return engine.ok() ? *std::move(engine) : nullptr;
  }

  // Submits every request (all before the first step), steps to the end, returns the results.
  std::vector<Result> Run(InferenceEngine& engine, const std::vector<GenerationRequest>& requests) {
    std::vector<Result> results(requests.size());
    std::vector<RequestId> ids;
    for (size_t i = 0; i < requests.size(); ++i) {
      auto id = engine.Submit(requests[i], Collector(&results[i]));
      EXPECT_TRUE(id.ok()) << id.status();
    }
    StepAll(engine);
    return results;
  }

  static TokenCallback Collector(Result* r) {
    return [r](const TokenEvent& e) {
      ++r->events;
      if (e.token) r->tokens.push_back(*e.token);
      r->text += e.text;
      if (e.finished) {
        ++r->finished_events;
        r->reason = e.finish_reason;
        r->status = e.status;
        r->usage = e.usage;
      }
    };
  }

  static void StepAll(InferenceEngine& engine) {
    for (int i = 0; i < 2000 && engine.HasWork(); ++i) {
      auto s = engine.Step();
      EXPECT_TRUE(s.ok()) << s;
    }
    EXPECT_FALSE(engine.HasWork());
  }

  Result Alone(const GenerationRequest& request) {
    auto engine = Engine();
    return Run(*engine, {request})[0];
  }

  const LlamaModel& model() const { return *model_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  AdapterStore& store() { return *store_; }

 private:
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<AdapterStore> store_;
};

inline std::vector<int32_t> RandomPrompt(int64_t n, uint64_t seed) {
  torch::manual_seed(seed);
  const torch::Tensor t = torch::randint(3, 500, {n}, torch::kInt);
  return std::vector<int32_t>(t.data_ptr<int32_t>(), t.data_ptr<int32_t>() + n);
}

inline GenerationRequest Greedy(std::vector<int32_t> prompt, const std::string& adapter,
                                int max_new) {
  GenerationRequest r;
  r.prompt_ids = std::move(prompt);
  r.adapter = adapter;
  r.sampling.max_new_tokens = max_new;
  r.sampling.repetition_penalty = 1.3f;
  r.ignore_eos = true;  // fixed lengths make the comparisons stronger
  return r;
}

}  // namespace lorad::engine::test_fixtures
