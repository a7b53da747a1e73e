// lorad's reading of config.json files against transformers' (tests/parity/
// reference_model_configs.py): per-architecture defaults, the window of the layers that slide,
// rope_scaling beside rope_parameters, and which projections carry a bias.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "engine/model/model_config.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

TEST(ModelConfigParity, ConfigsReadAsTransformersReadsThem) {
  const std::string path =
      std::string(std::getenv("LORAD_PARITY_DIR")) + "/model_configs/cases.json";
  std::ifstream in(path);
  ASSERT_TRUE(in) << "missing reference " << path;
  const nlohmann::json cases = nlohmann::json::parse(in);
  ASSERT_GE(cases.size(), 10u);
  for (const auto& c : cases) {
    SCOPED_TRACE(c["name"].get<std::string>());
    auto parsed = ModelConfig::Parse(c["config"].dump(), "config.json");
    if (c["refused"].get<bool>()) {
      // transformers cannot build it, or builds positions lorad does not compute: refused by name.
      ASSERT_FALSE(parsed.ok());
      EXPECT_NE(parsed.status().message().find("rope_scaling"), std::string::npos)
          << parsed.status();
      continue;
    }
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    const ModelConfig& m = *parsed;
    EXPECT_EQ(m.num_key_value_heads, c["num_key_value_heads"].get<int64_t>());
    // lorad serves a sliding model only within its window: the context is capped to it.
    const int64_t window = c["sliding_window"], context = c["max_position_embeddings"];
    const bool slides = window > 0 && window < context;
    EXPECT_EQ(m.sliding_window, slides ? window : 0);
    EXPECT_EQ(m.max_position_embeddings, slides ? window : context);
    EXPECT_EQ(m.attention_bias, c["q_bias"].get<bool>());
    EXPECT_EQ(m.mlp_bias, c["mlp_bias"].get<bool>());
    const auto& rope = c["rope"];
    EXPECT_EQ(m.rope.type, rope["type"].get<std::string>());
    EXPECT_DOUBLE_EQ(m.rope.theta, rope["theta"].get<double>());
    if (m.rope.type == "llama3") {
      EXPECT_DOUBLE_EQ(m.rope.factor, rope["factor"].get<double>());
      EXPECT_DOUBLE_EQ(m.rope.low_freq_factor, rope["low_freq_factor"].get<double>());
      EXPECT_DOUBLE_EQ(m.rope.high_freq_factor, rope["high_freq_factor"].get<double>());
      EXPECT_EQ(m.rope.original_max_position_embeddings,
                rope["original_max_position_embeddings"].get<int64_t>());
    }
  }
}

}  // namespace
}  // namespace lorad::engine
