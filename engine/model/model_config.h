// ModelConfig: the architecture of a Hugging Face model folder, read from its config.json.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace lorad::engine {

// Rotary position embedding parameters. `type` is "default" or "llama3" (Llama 3.1+ frequency
// scaling); the llama3 fields are used only for that type.
struct RopeConfig {
  double theta = 10000.0;
  std::string type = "default";
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 0;
};

struct ModelConfig {
  std::string architecture;  // LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM
  std::string model_type;    // llama, mistral, qwen2
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // < num_attention_heads means grouped-query attention
  int64_t head_dim = 0;             // hidden_size / num_attention_heads unless given
  // The context lorad serves: config.json's max_position_embeddings, or the sliding window when
  // the model has one that is shorter (lorad attends to the whole context, which equals
  // sliding-window attention exactly as long as no sequence outgrows the window).
  int64_t max_position_embeddings = 0;
  int64_t sliding_window = 0;  // the window of the layers that have one; 0: none
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v (Llama: and o) projections carry a bias (Qwen2: always)
  bool mlp_bias = false;        // gate/up/down carry a bias (Llama's mlp_bias)
  std::string hidden_act = "silu";
  std::string torch_dtype = "float32";  // the checkpoint's dtype: float32, bfloat16, float16
  std::vector<int64_t> bos_token_ids;
  std::vector<int64_t> eos_token_ids;

  // Parses config.json text; `source` names the file in error messages.
  static absl::StatusOr<ModelConfig> Parse(const std::string& json_text, const std::string& source);
  // Reads <folder>/config.json. Errors name the folder and what is missing.
  static absl::StatusOr<ModelConfig> LoadFromFolder(const std::string& folder);
};

// The architectures lorad can run, for error messages and docs.
const std::vector<std::string>& SupportedArchitectures();

}  // namespace lorad::engine
