// PackedSequences: rows packing several sequences. The flash segments (cu_seqlens) and the mask
// are two spellings of one rule (a sequence starts where positions do not go up by one, and at
// each row's start), and attention through the mask equals each sequence attended alone.
#include <gtest/gtest.h>

#include "engine/model/attention_cache.h"

namespace lorad::engine {
namespace {

// Two rows of 9: [0 1 2 | 0 1 | 0 1 2 3] and [0 1 2 3 4 5 | 0 1 2].
torch::Tensor Positions() {
  return torch::tensor({0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2}, torch::kLong)
      .view({2, 9});
}

TEST(PackedSequencesTest, SegmentsStartWherePositionsDoNotGoUpByOneAndAtEveryRow) {
  const PackedSequences packed = PackedSequences::FromPositions(Positions(), /*flash=*/true);
  ASSERT_TRUE(packed.cu_seqlens.defined());
  EXPECT_FALSE(packed.mask.defined());
  EXPECT_EQ(packed.cu_seqlens.scalar_type(), torch::kInt);
  EXPECT_TRUE(torch::equal(packed.cu_seqlens, torch::tensor({0, 3, 5, 9, 15, 18}, torch::kInt)));
  EXPECT_EQ(packed.max_seqlen, 6);
}

TEST(PackedSequencesTest, TheMaskLetsEachTokenSeeItsOwnSegmentsEarlierTokensOnly) {
  const PackedSequences segments = PackedSequences::FromPositions(Positions(), true);
  const PackedSequences masked = PackedSequences::FromPositions(Positions(), false);
  ASSERT_TRUE(masked.mask.defined());
  ASSERT_EQ(masked.mask.sizes(), (std::vector<int64_t>{2, 1, 9, 9}));
  // The mask the segments describe, built token by token.
  torch::Tensor want = torch::zeros({2, 1, 9, 9}, torch::kBool);
  const auto cu = segments.cu_seqlens.accessor<int32_t, 1>();
  for (int64_t s = 0; s + 1 < cu.size(0); ++s) {
    for (int64_t i = cu[s]; i < cu[s + 1]; ++i) {
      for (int64_t j = cu[s]; j <= i; ++j) want[i / 9][0][i % 9][j % 9] = true;
    }
  }
  EXPECT_TRUE(torch::equal(masked.mask, want));
}

TEST(PackedSequencesTest, MaskedAttentionEqualsEachSequenceAttendedAlone) {
  torch::manual_seed(0);
  // Four query heads on two KV heads (GQA), head_dim 8.
  const torch::Tensor q = torch::randn({2, 4, 9, 8});
  const torch::Tensor k = torch::randn({2, 2, 9, 8});
  const torch::Tensor v = torch::randn({2, 2, 9, 8});
  const PackedSequences packed = PackedSequences::FromPositions(Positions(), false);
  const torch::Tensor got = PackedAttention(q, k, v, packed);
  ASSERT_EQ(got.sizes(), q.sizes());
  const std::vector<std::vector<std::pair<int64_t, int64_t>>> sequences = {{{0, 3}, {3, 5}, {5, 9}},
                                                                           {{0, 6}, {6, 9}}};
  for (int64_t b = 0; b < 2; ++b) {
    for (const auto& [begin, end] : sequences[b]) {
      const auto part = [&](const torch::Tensor& t) {
        return t.narrow(0, b, 1).narrow(2, begin, end - begin);
      };
      const torch::Tensor alone = GroupedQueryAttention(part(q), part(k), part(v), torch::Tensor());
      EXPECT_TRUE(torch::allclose(part(got), alone, 1e-5, 1e-6))
          << "row " << b << " tokens [" << begin << ", " << end << ")";
    }
  }
}

TEST(PackedSequencesTest, FlashAttentionIsNotForCpuTensors) {
  EXPECT_FALSE(PackedSequences::FlashRuns(torch::zeros({1}, torch::kBFloat16), 64));
  EXPECT_FALSE(PackedSequences::FlashRuns(torch::zeros({1}), 64));
}

}  // namespace
}  // namespace lorad::engine
