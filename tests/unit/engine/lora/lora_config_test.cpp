#include "engine/lora/lora_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>

namespace lorad::engine {
namespace {

using ::testing::HasSubstr;

void ExpectInvalid(const LoraConfig& c, const std::string& field, const std::string& detail) {
  auto s = c.Validate();
  ASSERT_FALSE(s.ok()) << "accepted a bad " << field;
  EXPECT_THAT(std::string(s.message()), HasSubstr("'" + field + "'"));
  EXPECT_THAT(std::string(s.message()), HasSubstr(detail));
}

TEST(LoraConfigTest, DefaultsAndBoundsAreValid) {
  LoraConfig c;
  EXPECT_TRUE(c.Validate().ok());
  c.r = 1;
  c.dropout = 0.999;
  c.target_modules = {"down_proj"};
  EXPECT_TRUE(c.Validate().ok());
  c.r = 1024;
  EXPECT_TRUE(c.Validate().ok());
}

TEST(LoraConfigTest, RankOutsideRangeNamesR) {
  for (int r : {0, -4, 1025}) {
    LoraConfig c;
    c.r = r;
    ExpectInvalid(c, "r", std::to_string(r));
  }
}

TEST(LoraConfigTest, AlphaMustBePositiveAndAtMostAMillion) {
  for (double alpha : {0.0, -1.0, 1e308, std::numeric_limits<double>::infinity(),
                       std::numeric_limits<double>::quiet_NaN()}) {
    LoraConfig c;
    c.alpha = alpha;
    ExpectInvalid(c, "alpha", "(0, 1e+06]");
  }
}

TEST(LoraConfigTest, DropoutMustBeInZeroOne) {
  for (double dropout : {-0.1, 1.0000001, 2.0, std::numeric_limits<double>::quiet_NaN()}) {
    LoraConfig c;
    c.dropout = dropout;
    ExpectInvalid(c, "dropout", "[0, 1]");
  }
  // torch.nn.Dropout's (and so PEFT's) range includes 1.
  LoraConfig c;
  c.dropout = 1.0;
  EXPECT_TRUE(c.Validate().ok());
}

TEST(LoraConfigTest, TargetsMustBeKnownUniqueAndNotEmpty) {
  LoraConfig c;
  c.target_modules = {};
  ExpectInvalid(c, "target_modules", "empty");
  c.target_modules = {"q_proj", "lm_head"};
  ExpectInvalid(c, "target_modules", "'lm_head'");
  c.target_modules = {"q_proj", "q_proj"};
  ExpectInvalid(c, "target_modules", "twice");
}

TEST(LoraConfigTest, KnownTargetsAreTheSevenLlamaProjections) {
  EXPECT_THAT(KnownLoraTargets(), ::testing::ElementsAre("q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"));
}

TEST(LoraConfigTest, ScalingIsAlphaOverROrOverSqrtRWithRsLora) {
  LoraConfig c;
  c.r = 16;
  c.alpha = 32;
  EXPECT_DOUBLE_EQ(c.scaling(), 2.0);
  c.use_rslora = true;
  EXPECT_DOUBLE_EQ(c.scaling(), 8.0);
}

}  // namespace
}  // namespace lorad::engine
