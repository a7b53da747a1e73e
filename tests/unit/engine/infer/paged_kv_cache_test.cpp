// PagedKvCache under the tiny fixture model: a sequence split over scattered blocks, prefilled in
// chunks and decoded token by token beside other sequences of other lengths, gives the logits of
// one uncached forward over the whole sequence; so do fresh prompts, which attend to their own
// keys; bad block tables are errors.
#include "engine/infer/paged_kv_cache.h"

#include <gtest/gtest.h>

#include <cstdlib>

#include "engine/model/llama_model.h"
#include "tests/unit/engine/tiny_model.h"

namespace lorad::engine {
namespace {

// Logits [T, vocab] of one uncached forward over `ids`.
torch::Tensor Reference(const LlamaModel& m, const std::vector<int64_t>& ids) {
  auto logits = m.Forward({torch::tensor(ids).view({1, -1}), {}}, nullptr, ForwardOptions());
  EXPECT_TRUE(logits.ok()) << logits.status();
  return (*logits)[0];
}

TEST(PagedKvCacheTest, ChunkedPrefillAndDecodeOverScatteredBlocksEqualOneForward) {
  auto model = test_fixtures::LoadTinyModel();
  ASSERT_NE(model, nullptr);
  PagedKvCache cache(test_fixtures::PagedOptionsFor(*model, 16, 4));
  const torch::Tensor a_all = torch::randint(3, 500, {21}, torch::kLong);
  const torch::Tensor b_all = torch::randint(3, 500, {9}, torch::kLong);
  std::vector<int64_t> a(a_all.data_ptr<int64_t>(), a_all.data_ptr<int64_t>() + 21);
  std::vector<int64_t> b(b_all.data_ptr<int64_t>(), b_all.data_ptr<int64_t>() + 9);
  const torch::Tensor ref_a = Reference(*model, a);
  const torch::Tensor ref_b = Reference(*model, b);
  // Interleaved, out-of-order blocks: a owns 7 5 0 12 3 14, b owns 9 1 2 11.
  const std::vector<int32_t> table_a = {7, 5, 0, 12, 3, 14};
  const std::vector<int32_t> table_b = {9, 1, 2, 11};

  // Step 1: a prefills 10 tokens, b prefills 5 (right-padded rows).
  // Then a prefills 6 more while b decodes, and both decode one token at a time to the end.
  int64_t pos_a = 0, pos_b = 0;
  const std::vector<std::pair<int64_t, int64_t>> steps = {{10, 5}, {6, 1}, {1, 1}, {1, 1},
                                                          {1, 1},  {1, 0}, {1, 0}};
  for (const auto& [na, nb] : steps) {
    std::vector<PagedRow> rows;
    std::vector<std::vector<int64_t>> tokens;
    if (na > 0) {
      rows.push_back({table_a, pos_a, na});
      tokens.emplace_back(a.begin() + pos_a, a.begin() + pos_a + na);
    }
    if (nb > 0) {
      rows.push_back({table_b, pos_b, nb});
      tokens.emplace_back(b.begin() + pos_b, b.begin() + pos_b + nb);
    }
    const int64_t width = std::max(na, nb);
    torch::Tensor ids = torch::zeros({static_cast<int64_t>(rows.size()), width}, torch::kLong);
    std::vector<int64_t> lengths;
    for (size_t r = 0; r < tokens.size(); ++r) {
      for (size_t t = 0; t < tokens[r].size(); ++t) ids[r][t] = tokens[r][t];
      lengths.push_back(static_cast<int64_t>(tokens[r].size()));
    }
    ASSERT_TRUE(cache.Bind(rows).ok());
    auto logits = model->Forward({ids, lengths}, &cache, ForwardOptions());
    ASSERT_TRUE(logits.ok()) << logits.status();
    size_t r = 0;
    if (na > 0) {
      const double diff =
          ((*logits)[r++].narrow(0, 0, na) - ref_a.narrow(0, pos_a, na)).abs().max().item<double>();
      EXPECT_LT(diff, 1e-5) << "sequence a at " << pos_a;
      pos_a += na;
    }
    if (nb > 0) {
      const double diff =
          ((*logits)[r].narrow(0, 0, nb) - ref_b.narrow(0, pos_b, nb)).abs().max().item<double>();
      EXPECT_LT(diff, 1e-5) << "sequence b at " << pos_b;
      pos_b += nb;
    }
  }
  EXPECT_EQ(pos_a, 21);
  EXPECT_EQ(pos_b, 9);
}

// Whole prompts of one length from position 0 (the step attends to its own keys, causally,
// without gathering them back from the pool), then a second piece and decode steps that read
// what that step wrote: every step gives the logits of one uncached forward.
TEST(PagedKvCacheTest, FreshPromptsAttendToTheirOwnKeysAndLeaveThemForLaterSteps) {
  auto model = test_fixtures::LoadTinyModel();
  ASSERT_NE(model, nullptr);
  PagedKvCache cache(test_fixtures::PagedOptionsFor(*model, 16, 4));
  const int64_t total = 17;
  const torch::Tensor all = torch::randint(3, 500, {2, total}, torch::kLong);
  const std::vector<std::vector<int32_t>> tables = {{4, 0, 9, 2, 13}, {1, 8, 3, 15, 6}};
  std::vector<torch::Tensor> refs;
  for (int64_t r = 0; r < 2; ++r) {
    const torch::Tensor row = all[r].contiguous();
    refs.push_back(Reference(
        *model, std::vector<int64_t>(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + total)));
  }
  int64_t pos = 0;
  for (const int64_t n : {12, 3, 1, 1}) {  // the fresh step, a second piece, two decode steps
    ASSERT_TRUE(cache.Bind({{tables[0], pos, n}, {tables[1], pos, n}}).ok());
    auto logits =
        model->Forward({all.narrow(1, pos, n).contiguous(), {}}, &cache, ForwardOptions());
    ASSERT_TRUE(logits.ok()) << logits.status();
    for (int64_t r = 0; r < 2; ++r) {
      const double diff = ((*logits)[r] - refs[r].narrow(0, pos, n)).abs().max().item<double>();
      EXPECT_LT(diff, 1e-5) << "row " << r << " at " << pos;
    }
    pos += n;
  }
  EXPECT_EQ(pos, total);
}

TEST(PagedKvCacheTest, TablesThatDoNotCoverTheTokensOrLeaveThePoolAreErrors) {
  auto model = test_fixtures::LoadTinyModel();
  ASSERT_NE(model, nullptr);
  PagedKvCache cache(test_fixtures::PagedOptionsFor(*model, 4, 4));
  auto short_table = cache.Bind({{{0}, 2, 3}});  // 5 tokens need 2 blocks
  EXPECT_EQ(short_table.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(short_table.message().find("5 needed"), std::string::npos) << short_table;
  auto outside = cache.Bind({{{0, 4}, 0, 5}});
  EXPECT_EQ(outside.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(outside.message().find("block 4"), std::string::npos) << outside;
  EXPECT_TRUE(cache.Bind({{{3, 1}, 2, 3}}).ok());
  EXPECT_EQ(PagedKvCache::BytesPerBlock(2, 4, 2, 32, torch::kFloat), 2 * 2 * 4 * 2 * 32 * 4);
}

}  // namespace
}  // namespace lorad::engine
