// lorad's ROUGE against Google's rouge_score (tests/parity/reference_rouge.py).
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "engine/train/rouge.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

TEST(RougeParity, ScoresEqualRougeScore) {
  const std::string path = std::string(std::getenv("LORAD_PARITY_DIR")) + "/rouge/cases.json";
  std::ifstream in(path);
  ASSERT_TRUE(in) << "missing reference " << path;
  const nlohmann::json cases = nlohmann::json::parse(in);
  ASSERT_GE(cases.size(), 8u);
  for (const auto& c : cases) {
    const std::string prediction = c["prediction"], reference = c["reference"];
    SCOPED_TRACE(prediction + " | " + reference);
    const RougeScores s = Rouge(prediction, reference);
    EXPECT_NEAR(s.rouge1, c["rouge1"].get<double>(), 1e-12);
    EXPECT_NEAR(s.rouge2, c["rouge2"].get<double>(), 1e-12);
    EXPECT_NEAR(s.rouge_l, c["rougeL"].get<double>(), 1e-12);
  }
}

}  // namespace
}  // namespace lorad::engine
