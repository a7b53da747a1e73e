// LrSchedule against transformers' get_*_schedule_with_warmup, step by step.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

#include "engine/train/lr_schedule.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

TEST(LrScheduleParity, EqualsTransformersEveryStep) {
  const std::string path =
      std::string(std::getenv("LORAD_PARITY_DIR")) + "/lr_schedule/schedules.json";
  std::ifstream in(path);
  ASSERT_TRUE(in) << "missing reference " << path;
  const auto cases = nlohmann::json::parse(in);
  ASSERT_FALSE(cases.empty());
  for (const auto& c : cases) {
    auto kind = LrScheduleKindFromName(c["kind"].get<std::string>());
    ASSERT_TRUE(kind.ok());
    LrSchedule schedule(*kind, 1.0, c["warmup"].get<int64_t>(), c["total"].get<int64_t>());
    const auto& factors = c["factors"];
    for (size_t step = 0; step < factors.size(); ++step) {
      EXPECT_NEAR(schedule.Factor(static_cast<int64_t>(step)), factors[step].get<double>(), 1e-12)
          << c["kind"] << " warmup " << c["warmup"] << " total " << c["total"] << " step " << step;
    }
  }
}

}  // namespace
}  // namespace lorad::engine
