// LogLimiter: one line per key per interval, and its key table bounded without losing clients.
#include "server/log_limiter.h"

#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>

namespace lorad::server {
namespace {

using std::chrono::milliseconds;

constexpr int kKeys = 256;  // LogLimiter's table

// The table full of keys that have had their line: past their interval, they give way to new
// ones, each of which gets its own line; a key with lines held back keeps its count. Before, every
// key after the 256th ever seen shared one for the life of the process (a client refused later
// was silent because another had a line).
TEST(LogLimiterTest, KeysPastTheirIntervalGiveWayToNewOnes) {
  LogLimiter limiter(milliseconds(100));
  for (int i = 0; i < kKeys; ++i) ASSERT_TRUE(limiter.Allow("old" + std::to_string(i)));
  EXPECT_FALSE(limiter.Allow("old0"));  // held back: a count to keep
  std::this_thread::sleep_for(milliseconds(150));
  EXPECT_EQ(limiter.Allow("new-a"), 0);
  EXPECT_EQ(limiter.Allow("new-b"), 0);
  EXPECT_EQ(limiter.Allow("old0"), 1);
}

// Keys that held lines back and then went quiet (clients retrying twice, then gone) give way too,
// once those with nothing held back are gone: their counts are not lost but carried to the shared
// key's next line.
TEST(LogLimiterTest, KeysWithCountsGiveWayWhenNothingElseCan) {
  LogLimiter limiter(milliseconds(100));
  for (int i = 0; i < kKeys; ++i) {
    const std::string key = "retried" + std::to_string(i);
    ASSERT_TRUE(limiter.Allow(key));
    ASSERT_FALSE(limiter.Allow(key));
  }
  std::this_thread::sleep_for(milliseconds(150));
  for (int i = 0; i < 10; ++i) EXPECT_EQ(limiter.Allow("new" + std::to_string(i)), 0) << i;
}

// While every key is within its interval, new ones share a key: the log stays bounded.
TEST(LogLimiterTest, NewKeysShareOneWhileAllAreActive) {
  LogLimiter limiter(std::chrono::seconds(60));
  for (int i = 0; i < kKeys; ++i) ASSERT_TRUE(limiter.Allow("key" + std::to_string(i)));
  EXPECT_TRUE(limiter.Allow("late-a"));
  EXPECT_FALSE(limiter.Allow("late-b"));
  EXPECT_FALSE(limiter.Allow("key0"));  // its own interval too
}

}  // namespace
}  // namespace lorad::server
