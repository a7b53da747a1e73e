// InferenceEngine against transformers.generate (tests/parity/reference_generation.py): greedy
// decoding with repetition_penalty 1.3 gives the same token ids for text and id prompts, on the
// base and with two PEFT adapters of different ranks, each request alone and all of them in one
// mixed batch.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

#include "engine/infer/inference_engine.h"
#include "engine/lora/adapter_store.h"
#include "engine/model/llama_model.h"
#include "engine/model/tokenizer.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

using nlohmann::json;

struct Case {
  std::string name;
  GenerationRequest request;
  std::vector<int32_t> expected;
};

class GenerationParityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = std::string(std::getenv("LORAD_PARITY_DIR")) + "/generation/";
    std::ifstream in(dir + "cases.json");
    ASSERT_TRUE(in) << "missing reference " << dir << "cases.json";
    const json refs = json::parse(in);
    const char* folder = std::getenv("LORAD_TINY_MODEL");
    auto model = LlamaModel::Load(folder, LlamaModelOptions());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);
    auto tokenizer = LoadTokenizer(folder);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = *std::move(tokenizer);
    auto store = AdapterStore::Create(model_->config(), AdapterStoreOptions());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
    for (const json& c : refs["cases"]) {
      Case k;
      k.name = c["name"];
      if (!c["adapter"].is_null()) {
        const std::string path = c["adapter"];
        k.request.adapter = path.substr(path.find_last_of('/') + 1);
        if (!store_->Contains(k.request.adapter)) {
          auto v = store_->LoadPeft(k.request.adapter, path);
          ASSERT_TRUE(v.ok()) << v.status();
        }
      }
      if (c["prompt"].is_null()) {
        k.request.prompt_ids = c["prompt_ids"].get<std::vector<int32_t>>();
      } else {
        // lorad encodes the text itself; the reference's ids check that it agrees.
        k.request.prompt = c["prompt"];
        EXPECT_EQ(tokenizer_->Encode(k.request.prompt, true),
                  c["prompt_ids"].get<std::vector<int32_t>>())
            << k.name;
      }
      k.request.sampling.max_new_tokens = refs["max_new_tokens"];
      k.request.sampling.repetition_penalty = refs["repetition_penalty"];
      k.expected = c["expected"].get<std::vector<int32_t>>();
      cases_.push_back(std::move(k));
    }
    ASSERT_GE(cases_.size(), 10u);
  }

  std::vector<std::vector<int32_t>> Generate(const std::vector<const Case*>& cases,
                                             const InferenceEngineOptions& options) {
    auto engine = InferenceEngine::Create(model_.get(), tokenizer_.get(), store_.get(), options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    std::vector<std::vector<int32_t>> out(cases.size());
    for (size_t i = 0; i < cases.size(); ++i) {
      auto id = (*engine)->Submit(cases[i]->request, [&out, i](const TokenEvent& e) {
        if (e.token) out[i].push_back(*e.token);
      });
      EXPECT_TRUE(id.ok()) << id.status();
    }
    for (int step = 0; step < 1000 && (*engine)->HasWork(); ++step) {
      EXPECT_TRUE((*engine)->Step().ok());
    }
    return out;
  }

  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<AdapterStore> store_;
  std::vector<Case> cases_;
};

TEST_F(GenerationParityTest, GreedyWithRepetitionPenaltyMatchesTransformersAlone) {
  for (const Case& c : cases_) {
    InferenceEngineOptions options;
    options.kv_cache_bytes = 16 << 20;
    EXPECT_EQ(Generate({&c}, options)[0], c.expected) << c.name;
  }
}

TEST_F(GenerationParityTest, GreedyWithRepetitionPenaltyMatchesTransformersInOneMixedBatch) {
  std::vector<const Case*> all;
  for (const Case& c : cases_) all.push_back(&c);
  InferenceEngineOptions chunked;
  chunked.kv_cache_bytes = 16 << 20;
  chunked.scheduler.prefill_chunk = 5;  // longer prompts prefill over several iterations
  const auto got = Generate(all, chunked);
  for (size_t i = 0; i < all.size(); ++i) EXPECT_EQ(got[i], all[i]->expected) << all[i]->name;
}

}  // namespace
}  // namespace lorad::engine
