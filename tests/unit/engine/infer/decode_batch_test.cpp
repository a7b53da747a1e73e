// DecodeBatch + LlamaModel::DecodeStep (the paged decode path the inference engine and its CUDA
// graphs use) under the tiny fixture model: after a prefill through Forward, decoding token by
// token with device-side indices, scattered blocks and padding rows gives the logits of one
// uncached forward over each whole sequence, with the torch ops and with the fused ones (the GPU's
// path, through the kernels' CPU references); the DecodeRunner gives the same; bad rows are errors.
#include "engine/infer/decode_batch.h"

#include <gtest/gtest.h>

#include <cstdlib>

#include "engine/infer/decode_runner.h"
#include "engine/model/fused_layer_ops.h"
#include "engine/model/llama_model.h"
#include "tests/unit/engine/tiny_model.h"

namespace lorad::engine {
namespace {

std::vector<int64_t> RandomIds(int64_t n) {
  const torch::Tensor t = torch::randint(3, 500, {n}, torch::kLong);
  return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n);
}

// Logits [T, vocab] of one uncached forward over `ids`.
torch::Tensor Reference(const LlamaModel& m, const std::vector<int64_t>& ids) {
  auto logits = m.Forward({torch::tensor(ids).view({1, -1}), {}}, nullptr, ForwardOptions());
  EXPECT_TRUE(logits.ok()) << logits.status();
  return (*logits)[0];
}

// Prefills `prompt` tokens of each sequence through Forward on `cache`.
void Prefill(const LlamaModel& m, PagedKvCache& cache, const std::vector<int64_t>& ids,
             const std::vector<int32_t>& table, int64_t prompt) {
  ASSERT_TRUE(cache.Bind({{table, 0, prompt}}).ok());
  const torch::Tensor t = torch::tensor(std::vector<int64_t>(ids.begin(), ids.begin() + prompt));
  auto logits = m.Forward({t.view({1, -1}), {}}, &cache, ForwardOptions());
  ASSERT_TRUE(logits.ok()) << logits.status();
}

// With `mode` for the whole test (kAlsoOnCpu: the GPU's fused path through the kernels' CPU
// references: the rotary and cache write in one kernel, the residual adds in the norms').
void ExpectDecodeStepsEqualOneForward(FusedLayerOps mode) {
  SetFusedLayerOps(mode);
  struct Restore {
    ~Restore() { SetFusedLayerOps(FusedLayerOps::kCuda); }
  } restore;
  torch::manual_seed(5);
  auto model = test_fixtures::LoadTinyModel();
  ASSERT_NE(model, nullptr);
  PagedKvCache cache(test_fixtures::PagedOptionsFor(*model, 16, 4));
  const std::vector<int64_t> a = RandomIds(15), b = RandomIds(8);
  const std::vector<int32_t> table_a = {7, 5, 0, 12}, table_b = {9, 1};
  const torch::Tensor ref_a = Reference(*model, a), ref_b = Reference(*model, b);
  Prefill(*model, cache, a, table_a, 9);
  Prefill(*model, cache, b, table_b, 2);
  // Four rows of buffers for two sequences: rows 2 and 3 are padding.
  DecodeBatch batch(&cache, 4);
  int64_t pos_b = 2;
  for (int64_t pos_a = 9; pos_a < 15; ++pos_a, ++pos_b) {
    std::vector<DecodeRow> rows = {{a[pos_a], pos_a, table_a, -1}};
    if (pos_b < 8) rows.push_back({b[pos_b], pos_b, table_b, -1});
    ASSERT_TRUE(batch.Fill(rows, -1).ok());
    const torch::Tensor logits = model->DecodeStep(batch.ids(), batch.positions(), &batch, nullptr);
    ASSERT_EQ(logits.size(0), 4);
    EXPECT_LT((logits[0] - ref_a[pos_a]).abs().max().item<float>(), 1e-4) << "a at " << pos_a;
    if (pos_b < 8) {
      EXPECT_LT((logits[1] - ref_b[pos_b]).abs().max().item<float>(), 1e-4) << "b at " << pos_b;
    }
  }
  // The scratch block is the only one padding touched: a block nobody owns is still zero.
  EXPECT_EQ(cache.keys(0).narrow(0, 3 * 4, 4).abs().sum().item<float>(), 0.0f);
  EXPECT_EQ(cache.values(0).narrow(0, 3 * 4, 4).abs().sum().item<float>(), 0.0f);
}

TEST(DecodeBatchTest, DecodeStepsOverScatteredBlocksWithPaddingEqualOneForward) {
  ExpectDecodeStepsEqualOneForward(FusedLayerOps::kOff);
}

TEST(DecodeBatchTest, FusedOpsDecodeStepsOverScatteredBlocksEqualOneForward) {
  ExpectDecodeStepsEqualOneForward(FusedLayerOps::kAlsoOnCpu);
}

TEST(DecodeBatchTest, RunnerEqualsForwardForAStep) {
  torch::manual_seed(6);
  auto model = test_fixtures::LoadTinyModel();
  ASSERT_NE(model, nullptr);
  PagedKvCache cache(test_fixtures::PagedOptionsFor(*model, 8, 4));
  const std::vector<int64_t> a = RandomIds(6);
  const torch::Tensor ref = Reference(*model, a);
  Prefill(*model, cache, a, {3, 6}, 5);
  DecodeRunner runner(model.get(), &cache, DecodeRunnerOptions());
  auto logits = runner.Run({{a[5], 5, {3, 6}, -1}}, nullptr);
  ASSERT_TRUE(logits.ok()) << logits.status();
  ASSERT_EQ(logits->size(0), 1);
  EXPECT_LT(((*logits)[0] - ref[5]).abs().max().item<float>(), 1e-4);
  EXPECT_EQ(runner.graphs_captured(), 0);  // CPU runs eagerly
}

TEST(DecodeBatchTest, RowsOutsideTheirBlocksOrThePoolAreErrors) {
  auto model = test_fixtures::LoadTinyModel();
  ASSERT_NE(model, nullptr);
  PagedKvCache cache(test_fixtures::PagedOptionsFor(*model, 4, 4));
  DecodeBatch batch(&cache, 2);
  EXPECT_FALSE(batch.Fill({{1, 4, {0}, -1}}, -1).ok());  // position 4 needs a second block
  EXPECT_FALSE(batch.Fill({{1, 0, {4}, -1}}, -1).ok());  // block 4 is the scratch block
  EXPECT_FALSE(batch.Fill({{1, 0, {0}, -1}, {1, 0, {1}, -1}, {1, 0, {2}, -1}}, -1).ok());
  EXPECT_TRUE(batch.Fill({{1, 3, {2}, -1}}, -1).ok());
}

}  // namespace
}  // namespace lorad::engine
