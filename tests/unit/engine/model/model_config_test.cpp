#include "engine/model/model_config.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

namespace lorad::engine {
namespace {

constexpr const char* kLlama3Config = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
  "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "hidden_act": "silu"})";

TEST(ModelConfig, ParsesLlama3WithRopeScalingAndEosList) {
  auto c = ModelConfig::Parse(kLlama3Config, "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "LlamaForCausalLM");
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->rope.type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(c->rope.factor, 8.0);
  EXPECT_EQ(c->rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_EQ(c->torch_dtype, "bfloat16");
}

TEST(ModelConfig, Qwen2DefaultsToAttentionBias) {
  auto c = ModelConfig::Parse(R"({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10,
      "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
      "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true})",
                              "qwen/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);
  EXPECT_TRUE(c->tie_word_embeddings);
}

TEST(ModelConfig, UnknownArchitectureIsNamed) {
  auto c = ModelConfig::Parse(R"({"architectures": ["GPT2LMHeadModel"]})", "x/config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("GPT2LMHeadModel"), std::string::npos);
  EXPECT_NE(c.status().message().find("x/config.json"), std::string::npos);
}

TEST(ModelConfig, MissingFieldIsNamed) {
  auto c = ModelConfig::Parse(R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10,
      "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4})",
                              "m/config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("intermediate_size"), std::string::npos);
}

// A small config of `architecture` with `extra` fields (JSON members, comma-led) appended.
std::string SmallConfig(const std::string& architecture, const std::string& extra) {
  return R"({"architectures": [")" + architecture + R"("], "vocab_size": 10, "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 4,
      "max_position_embeddings": 32)" +
         extra + "}";
}

// What transformers refuses, named by the field at fault: a rope type lorad cannot run (as
// rope_parameters.rope_type, or the older rope_scaling.type), and heads that do not split the
// hidden size without a head_dim.
TEST(ModelConfig, UnsupportedRopeAndUnevenHeadsNameTheField) {
  for (const auto& [extra, field] :
       {std::pair{std::string(R"(, "rope_parameters": {"rope_type": "yarn", "factor": 4.0})"),
                  "rope_parameters.rope_type 'yarn'"},
        std::pair{std::string(R"(, "rope_scaling": {"type": "linear", "factor": 2.0})"),
                  "rope_scaling.type 'linear'"}}) {
    auto c = ModelConfig::Parse(SmallConfig("LlamaForCausalLM", extra), "t/config.json");
    ASSERT_FALSE(c.ok());
    EXPECT_NE(c.status().message().find(field), std::string::npos) << c.status();
  }
  auto uneven = ModelConfig::Parse(
      R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 6})",
      "u/config.json");
  ASSERT_FALSE(uneven.ok());
  EXPECT_NE(uneven.status().message().find("hidden_size (64) is not a multiple of "
                                           "num_attention_heads (6)"),
            std::string::npos)
      << uneven.status();
  auto mlp = ModelConfig::Parse(SmallConfig("LlamaForCausalLM", R"(, "mlp_bias": true)"), "m");
  ASSERT_TRUE(mlp.ok()) << mlp.status();
  EXPECT_TRUE(mlp->mlp_bias);
}

TEST(ModelConfig, AFieldOfTheWrongTypeIsNamed) {
  for (const std::string& extra :
       {std::string(R"(, "rms_norm_eps": "1e-6")"), std::string(R"(, "tie_word_embeddings": "no")"),
        std::string(R"(, "rope_parameters": {"rope_type": "default", "rope_theta": "1e4"})")}) {
    SCOPED_TRACE(extra);
    auto c = ModelConfig::Parse(SmallConfig("LlamaForCausalLM", extra), "t/config.json");
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(c.status().message().find("t/config.json: field '"), std::string::npos) << c.status();
    EXPECT_NE(c.status().message().find("' must be "), std::string::npos) << c.status();
  }
}

TEST(ModelConfig, Llama3RopeFollowsTransformersDefaultsAndRequirements) {
  const std::string rope =
      R"(, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
         "low_freq_factor": 1.0, "high_freq_factor": 4.0})";
  auto c = ModelConfig::Parse(SmallConfig("LlamaForCausalLM", rope), "r/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope.original_max_position_embeddings, 32);  // max_position_embeddings
  auto missing = ModelConfig::Parse(
      SmallConfig("LlamaForCausalLM",
                  R"(, "rope_parameters": {"rope_type": "llama3", "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0})"),
      "r/config.json");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("'factor'"), std::string::npos) << missing.status();
}

TEST(ModelConfig, ModelTypeStandsInForArchitecturesAndSwishIsSilu) {
  auto c = ModelConfig::Parse(R"({"model_type": "mistral", "vocab_size": 10, "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
      "num_key_value_heads": 4, "hidden_act": "swish"})",
                              "n/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "MistralForCausalLM");
  EXPECT_EQ(c->hidden_act, "silu");
}

TEST(ModelConfig, OtherQuantizationMethodsAreRefusedByName) {
  for (const std::string& q :
       {std::string(R"({"quant_method": "gptq", "bits": 4})"),
        std::string(R"({"quant_method": "bitsandbytes", "load_in_8bit": true})"),
        // transformers' default 4-bit config, FP4 without double quantization: refused here
        // (exit 2, before the data folder is touched), not once its weights load.
        std::string(R"({"quant_method": "bitsandbytes", "load_in_4bit": true,
                        "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": false})"),
        std::string(R"({"quant_method": "bitsandbytes", "load_in_4bit": true,
                        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": false})")}) {
    auto c = ModelConfig::Parse(SmallConfig("LlamaForCausalLM", ", \"quantization_config\": " + q),
                                "q/config.json");
    ASSERT_FALSE(c.ok()) << q;
    EXPECT_TRUE(absl::IsInvalidArgument(c.status())) << c.status();
    EXPECT_NE(c.status().message().find("unquantized model folder"), std::string::npos)
        << c.status();
  }
  // MLX's quantized folders (mlx-community's -4bit) say so outside quantization_config.
  auto mlx = ModelConfig::Parse(
      SmallConfig("LlamaForCausalLM", R"(, "quantization": {"group_size": 64, "bits": 4})"),
      "q/config.json");
  ASSERT_FALSE(mlx.ok());
  EXPECT_NE(mlx.status().message().find("quantized by MLX"), std::string::npos) << mlx.status();
  auto nf4 = ModelConfig::Parse(
      SmallConfig("LlamaForCausalLM",
                  R"(, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
                     "bnb_4bit_quant_type": "nf4"})"),
      "q/config.json");
  EXPECT_TRUE(nf4.ok()) << nf4.status();
}

TEST(ModelConfig, ASlidingWindowShorterThanTheContextCapsIt) {
  struct Case {
    std::string architecture, extra;
    int64_t window, context;
  };
  const std::vector<Case> cases = {
      {"MistralForCausalLM", R"(, "sliding_window": 4)", 4, 4},
      {"MistralForCausalLM", R"(, "sliding_window": 64)", 0, 32},
      {"MistralForCausalLM", R"(, "sliding_window": null)", 0, 32},
      {"Qwen2ForCausalLM", R"(, "sliding_window": 4, "use_sliding_window": false)", 0, 32},
      {"Qwen2ForCausalLM",
       R"(, "sliding_window": 4, "use_sliding_window": true, "max_window_layers": 1)", 4, 4},
      {"Qwen2ForCausalLM",
       R"(, "sliding_window": 4, "use_sliding_window": true, "max_window_layers": 2)", 0, 32},
      {"LlamaForCausalLM",
       R"(, "sliding_window": 4, "layer_types": ["full_attention", "full_attention"])", 0, 32},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.architecture + k.extra);
    auto c = ModelConfig::Parse(SmallConfig(k.architecture, k.extra), "w/config.json");
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->sliding_window, k.window);
    EXPECT_EQ(c->max_position_embeddings, k.context);
  }
}

TEST(ModelConfig, MalformedJsonIsAnError) {
  EXPECT_FALSE(ModelConfig::Parse("{not json", "bad.json").ok());
}

TEST(ModelConfig, FolderWithoutConfigIsNotAModelFolder) {
  auto c = ModelConfig::LoadFromFolder(LORAD_SOURCE_DIR "/deploy");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("not a model folder"), std::string::npos);
  EXPECT_FALSE(ModelConfig::LoadFromFolder("/nonexistent/model").ok());
}

// A Hugging Face cache snapshot mounted without the cache's blobs/ folder (a container's -v of
// the snapshot alone): config.json is there but links to nothing. Said so; it read "has no
// config.json" while `ls` showed one.
TEST(ModelConfig, AConfigLinkingToNothingIsNamedAsSuch) {
  namespace fs = std::filesystem;
  const fs::path folder = fs::path(::testing::TempDir()) / "model_config_test-snapshot";
  fs::remove_all(folder);
  fs::create_directories(folder);
  fs::create_symlink("../../blobs/0123abcd", folder / "config.json");
  auto c = ModelConfig::LoadFromFolder(folder.string());
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find(
                "config.json is a symlink to ../../blobs/0123abcd, which does not exist here"),
            std::string::npos)
      << c.status();
  fs::remove_all(folder);
}

TEST(ModelConfig, LoadsTheTinyFixtureModel) {
  const char* folder = std::getenv("LORAD_TINY_MODEL");
  ASSERT_NE(folder, nullptr) << "LORAD_TINY_MODEL is set by the build (make test)";
  auto c = ModelConfig::LoadFromFolder(folder);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_attention_heads, 4);
  EXPECT_EQ(c->num_key_value_heads, 2);
  EXPECT_EQ(c->rope.type, "default");  // transformers 5 writes rope_parameters
}

}  // namespace
}  // namespace lorad::engine
