// The tiny fixture model (LORAD_TINY_MODEL, made by tests/fixtures/make_tiny_model.py) for the
// engine's unit tests, and a paged KV cache shaped for it.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>

#include "engine/infer/paged_kv_cache.h"
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

}  // namespace lorad::engine::test_fixtures
