#include "engine/infer/kv_block_allocator.h"

#include <gtest/gtest.h>

namespace lorad::engine {
namespace {

TEST(KvBlockAllocator, ReservesWholeBlocksAndGrowsTables) {
  KvBlockAllocator kv(/*num_blocks=*/4, /*block_size=*/16);
  ASSERT_TRUE(kv.Reserve(1, 17).ok());  // 2 blocks
  EXPECT_EQ(kv.BlockTable(1), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(kv.ExtraBlocksFor(1, 32), 0);
  EXPECT_EQ(kv.ExtraBlocksFor(1, 33), 1);
  ASSERT_TRUE(kv.Reserve(1, 33).ok());
  EXPECT_EQ(kv.BlockTable(1).size(), 3u);
  EXPECT_DOUBLE_EQ(kv.Usage(), 0.75);
}

TEST(KvBlockAllocator, ExhaustionChangesNothingAndReleaseReturnsBlocks) {
  KvBlockAllocator kv(3, 8);
  ASSERT_TRUE(kv.Reserve(1, 16).ok());
  auto status = kv.Reserve(2, 17);  // needs 3, 1 free
  EXPECT_TRUE(absl::IsResourceExhausted(status));
  EXPECT_TRUE(kv.BlockTable(2).empty());
  EXPECT_EQ(kv.free_blocks(), 1);
  kv.Release(1);
  EXPECT_EQ(kv.free_blocks(), 3);
  ASSERT_TRUE(kv.Reserve(2, 17).ok());
  kv.Release(99);  // unknown: no-op
  EXPECT_EQ(kv.free_blocks(), 0);
}

}  // namespace
}  // namespace lorad::engine
