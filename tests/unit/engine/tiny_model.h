// The tiny fixture model (LORAD_TINY_MODEL, made by tests/fixtures/make_tiny_model.py) for the
// engine's unit tests, a paged KV cache shaped for it, and one training step's loss and LoRA
// gradients on it.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <vector>

#include "engine/infer/paged_kv_cache.h"
#include "engine/lora/lora_adapter.h"
#include "engine/model/llama_model.h"

namespace lorad::engine::test_fixtures {

// The model, or nullptr after a test failure that says why.
inline std::unique_ptr<LlamaModel> LoadTinyModel(const LlamaModelOptions& options = {}) {
  auto model = LlamaModel::Load(std::getenv("LORAD_TINY_MODEL"), options);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? *std::move(model) : nullptr;
}

// A pool of `blocks` blocks of `block_size` tokens for `model`, on the CPU in fp32.
inline PagedKvCacheOptions PagedOptionsFor(const LlamaModel& model, int64_t blocks,
                                           int64_t block_size) {
  PagedKvCacheOptions o;
  o.num_layers = model.config().num_hidden_layers;
  o.num_blocks = blocks;
  o.block_size = block_size;
  o.kv_heads = model.config().num_key_value_heads;
  o.head_dim = model.config().head_dim;
  o.max_context = model.config().max_position_embeddings;
  return o;
}

// One training step of `model` on `ids` (labels = ids, or `labels`) with a fresh adapter of
// `config`: PEFT's initialisation, then B drawn from N(0, 0.05) (PEFT's zero B would hide A's
// gradients). Returns the loss, then each A's and B's gradient; `options` says how to train (train
// and adapter are set here). The global random state is seeded, so two calls draw the same adapter
// and dropout.
inline std::vector<torch::Tensor> LossAndLoraGradients(const LlamaModel& model,
                                                       const LoraConfig& config,
                                                       const ForwardBatch& batch,
                                                       ForwardOptions options,
                                                       torch::Tensor labels = {}) {
  torch::manual_seed(3);
  auto adapter = LoraAdapter::Init(model.config(), config, 1);
  EXPECT_TRUE(adapter.ok()) << adapter.status();
  if (!adapter.ok()) return {};
  {
    torch::NoGradGuard no_grad;
    for (auto& [path, pair] : adapter->layers) pair.b.normal_(0, 0.05);
  }
  for (auto& [path, pair] : adapter->layers) {
    pair.a.requires_grad_(true);
    pair.b.requires_grad_(true);
  }
  options.adapter = &*adapter;
  options.train = true;
  torch::manual_seed(5);
  torch::AutoGradMode grad(true);
  // Undefined labels: every token (but the padding).
  auto loss = model.Loss(batch, labels.defined() ? labels : batch.input_ids.clone(), options);
  EXPECT_TRUE(loss.ok()) << loss.status();
  if (!loss.ok()) return {};
  loss->backward();
  std::vector<torch::Tensor> out = {loss->detach()};
  for (auto& [path, pair] : adapter->layers) {
    out.push_back(pair.a.grad().clone());
    out.push_back(pair.b.grad().clone());
  }
  return out;
}

}  // namespace lorad::engine::test_fixtures
