// LogLimiter: one line per key per interval, and its key table bounded without losing clients.
#include "server/log_limiter.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>
#include <utility>
#include <vector>

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

// A burst, then quiet: the count held back was written only with the key's next line, so a
// client refused 500 times in a second and never again left one line and no count. It is taken
// once the interval has passed with the last line written, and all of it at shutdown.
TEST(LogLimiterTest, CountsNoLaterLineCarriesAreTaken) {
  LogLimiter limiter(milliseconds(100));
  std::vector<std::pair<std::string, int64_t>> taken;
  const auto take = [&](const std::string& line, int64_t held, spdlog::level::level_enum) {
    taken.emplace_back(line, held);
  };
  ASSERT_EQ(limiter.Allow("client-a", "refused a"), 0);
  ASSERT_EQ(limiter.Allow("client-b", "refused b"), 0);
  for (int i = 0; i < 5; ++i) ASSERT_FALSE(limiter.Allow("client-a", "refused a again"));
  limiter.TakeHeldBack(false, take);
  EXPECT_TRUE(taken.empty());  // within the interval: a next line may still carry it
  std::this_thread::sleep_for(milliseconds(150));
  limiter.TakeHeldBack(false, take);
  ASSERT_EQ(taken.size(), 1u);
  EXPECT_EQ(taken[0], std::make_pair(std::string("refused a"), int64_t{5}));
  // Taken counts start again: the key's next line has none to carry, and is held back as after
  // a written line; at shutdown every count goes, whatever its interval.
  EXPECT_FALSE(limiter.Allow("client-a", "refused a"));
  limiter.TakeHeldBack(false, take);
  EXPECT_EQ(taken.size(), 1u);
  limiter.TakeHeldBack(true, take);
  ASSERT_EQ(taken.size(), 2u);
  EXPECT_EQ(taken[1], std::make_pair(std::string("refused a"), int64_t{1}));
  // The daemon's writer reaches every limiter of the process (most are function-local statics).
  ASSERT_EQ(limiter.Allow("client-b", "refused b again"), 0);
  for (int i = 0; i < 2; ++i) ASSERT_FALSE(limiter.Allow("client-b", "refused b once more"));
  std::this_thread::sleep_for(milliseconds(150));
  taken.clear();
  LogLimiter::TakeAllHeldBack(false, take);
  EXPECT_NE(std::find(taken.begin(), taken.end(),
                      std::make_pair(std::string("refused b again"), int64_t{2})),
            taken.end());
  // At the level of its line: counts of gRPC's debug lines stayed warnings in an info log.
  std::vector<spdlog::level::level_enum> levels;
  ASSERT_EQ(limiter.Allow("grpc", "grpc config.cc:113: ...", spdlog::level::debug), 0);
  ASSERT_FALSE(limiter.Allow("grpc", "grpc config.cc:113: ...", spdlog::level::debug));
  limiter.TakeHeldBack(true, [&](const std::string&, int64_t, spdlog::level::level_enum level) {
    levels.push_back(level);
  });
  EXPECT_EQ(levels, std::vector<spdlog::level::level_enum>{spdlog::level::debug});
}

}  // namespace
}  // namespace lorad::server
