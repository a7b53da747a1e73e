// OpenCalls and OpenCallsPerKey: places are taken up to the limit, given back when a slot is
// destroyed (also after the counter that handed it out is gone), and per key independently.
#include "server/open_calls.h"

#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lorad::server {
namespace {

TEST(OpenCallsTest, TakesUpToItsLimitAndGetsPlacesBack) {
  OpenCalls calls(2);
  std::optional<OpenCalls::Slot> a = calls.TryTake();
  std::optional<OpenCalls::Slot> b = calls.TryTake();
  ASSERT_TRUE(a && b);
  EXPECT_FALSE(calls.TryTake());
  a.reset();
  EXPECT_TRUE(calls.TryTake());  // taken and given back at once
  EXPECT_TRUE(calls.TryTake());
}

TEST(OpenCallsPerKeyTest, EachKeyHasItsOwnLimitAndSaysHowManyItHolds) {
  OpenCallsPerKey calls(2);
  std::vector<OpenCallsPerKey::Slot> busy;
  int64_t open = -1;
  for (int i = 0; i < 2; ++i) {
    auto slot = calls.TryTake("busy", &open);
    ASSERT_TRUE(slot);
    EXPECT_EQ(open, i);
    busy.push_back(*std::move(slot));
  }
  EXPECT_FALSE(calls.TryTake("busy", &open));
  EXPECT_EQ(open, 2);
  auto other = calls.TryTake("other", &open);
  EXPECT_TRUE(other);
  EXPECT_EQ(open, 0);
  EXPECT_EQ(calls.keys(), 2u);
  busy.pop_back();
  EXPECT_TRUE(calls.TryTake("busy"));
}

// Clients come and go (without tokens every connection is one): a key with no call open is
// forgotten, so the table does not grow with every client ever seen.
TEST(OpenCallsPerKeyTest, KeysWithNoCallOpenAreForgotten) {
  OpenCallsPerKey calls(1);
  for (int i = 0; i < 1000; ++i) {
    auto slot = calls.TryTake("client " + std::to_string(i));
    ASSERT_TRUE(slot);
  }
  EXPECT_EQ(calls.keys(), 0u);
  auto held = calls.TryTake("held");
  EXPECT_FALSE(calls.TryTake("held"));  // a refusal keeps the holder's count as it was
  EXPECT_EQ(calls.keys(), 1u);
  held.reset();
  EXPECT_EQ(calls.keys(), 0u);
}

TEST(OpenCallsPerKeyTest, ASlotOutlivesItsCounter) {
  std::optional<OpenCallsPerKey::Slot> slot;
  {
    OpenCallsPerKey calls(1);
    auto taken = calls.TryTake("stream");
    ASSERT_TRUE(taken);
    slot.emplace(*std::move(taken));
  }
  slot.reset();  // gives its place back to a counter only it still holds
}

}  // namespace
}  // namespace lorad::server
