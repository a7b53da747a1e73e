#include "engine/model/model_config.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

using nlohmann::json;

absl::Status Missing(const std::string& source, const std::string& key) {
  return absl::InvalidArgumentError(
      absl::StrCat(source, ": required field '", key, "' is missing or not a number"));
}

// Reads a required positive integer field.
absl::StatusOr<int64_t> RequiredInt(const json& j, const std::string& source,
                                    const std::string& key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer()) return Missing(source, key);
  const int64_t v = it->get<int64_t>();
  if (v <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field '", key, "' must be positive, got ", v));
  }
  return v;
}

template <typename T>
T Optional(const json& j, const std::string& key, T fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  return it->get<T>();
}

// bos/eos ids are an int, a list of ints, or null.
std::vector<int64_t> TokenIds(const json& j, const std::string& key) {
  std::vector<int64_t> ids;
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return ids;
  if (it->is_number_integer()) ids.push_back(it->get<int64_t>());
  if (it->is_array()) {
    for (const auto& v : *it) {
      if (v.is_number_integer()) ids.push_back(v.get<int64_t>());
    }
  }
  return ids;
}

absl::StatusOr<RopeConfig> ParseRope(const json& j, const std::string& source) {
  RopeConfig rope;
  rope.theta = Optional<double>(j, "rope_theta", rope.theta);
  // transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
  const json* params = nullptr;
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    params = &j["rope_parameters"];
  } else if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) {
    params = &j["rope_scaling"];
  }
  if (params == nullptr) return rope;
  rope.theta = Optional<double>(*params, "rope_theta", rope.theta);
  rope.type = Optional<std::string>(*params, "rope_type",
                                    Optional<std::string>(*params, "type", "default"));
  if (rope.type == "default") return rope;
  if (rope.type != "llama3") {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": rope type '", rope.type, "' is not supported (supported: default, llama3)"));
  }
  rope.factor = Optional<double>(*params, "factor", rope.factor);
  rope.low_freq_factor = Optional<double>(*params, "low_freq_factor", rope.low_freq_factor);
  rope.high_freq_factor = Optional<double>(*params, "high_freq_factor", rope.high_freq_factor);
  rope.original_max_position_embeddings =
      Optional<int64_t>(*params, "original_max_position_embeddings", 8192);
  return rope;
}

}  // namespace

const std::vector<std::string>& SupportedArchitectures() {
  static const std::vector<std::string> kArchitectures = {"LlamaForCausalLM", "MistralForCausalLM",
                                                          "Qwen2ForCausalLM"};
  return kArchitectures;
}

absl::StatusOr<ModelConfig> ModelConfig::Parse(const std::string& json_text,
                                               const std::string& source) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  }
  ModelConfig c;
  if (!j.contains("architectures") || !j["architectures"].is_array() ||
      j["architectures"].empty() || !j["architectures"][0].is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field 'architectures' is missing; expected one of ",
                     absl::StrJoin(SupportedArchitectures(), ", ")));
  }
  c.architecture = j["architectures"][0].get<std::string>();
  const auto& known = SupportedArchitectures();
  if (std::find(known.begin(), known.end(), c.architecture) == known.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": architecture '", c.architecture,
                     "' is not supported (supported: ", absl::StrJoin(known, ", "), ")"));
  }
  c.model_type = Optional<std::string>(j, "model_type", "");
  for (auto [field, key] :
       {std::pair{&c.vocab_size, "vocab_size"}, std::pair{&c.hidden_size, "hidden_size"},
        std::pair{&c.intermediate_size, "intermediate_size"},
        std::pair{&c.num_hidden_layers, "num_hidden_layers"},
        std::pair{&c.num_attention_heads, "num_attention_heads"}}) {
    auto v = RequiredInt(j, source, key);
    if (!v.ok()) return v.status();
    *field = *v;
  }
  c.num_key_value_heads = Optional<int64_t>(j, "num_key_value_heads", c.num_attention_heads);
  c.head_dim = Optional<int64_t>(j, "head_dim", c.hidden_size / c.num_attention_heads);
  c.max_position_embeddings = Optional<int64_t>(j, "max_position_embeddings", 4096);
  c.rms_norm_eps = Optional<double>(j, "rms_norm_eps", c.rms_norm_eps);
  c.tie_word_embeddings = Optional<bool>(j, "tie_word_embeddings", false);
  c.attention_bias = Optional<bool>(j, "attention_bias", c.architecture == "Qwen2ForCausalLM");
  c.hidden_act = Optional<std::string>(j, "hidden_act", c.hidden_act);
  c.torch_dtype =
      Optional<std::string>(j, "torch_dtype", Optional<std::string>(j, "dtype", "float32"));
  c.bos_token_ids = TokenIds(j, "bos_token_id");
  c.eos_token_ids = TokenIds(j, "eos_token_id");

  auto rope = ParseRope(j, source);
  if (!rope.ok()) return rope.status();
  c.rope = *rope;

  if (c.num_key_value_heads <= 0 || c.num_attention_heads % c.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": num_attention_heads (", c.num_attention_heads,
                     ") must be a multiple of num_key_value_heads (", c.num_key_value_heads, ")"));
  }
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": head_dim must be a positive even number, got ", c.head_dim));
  }
  if (c.hidden_act != "silu") {
    return absl::InvalidArgumentError(absl::StrCat(source, ": hidden_act '", c.hidden_act,
                                                   "' is not supported (supported: silu)"));
  }
  return c;
}

absl::StatusOr<ModelConfig> ModelConfig::LoadFromFolder(const std::string& folder) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(folder, ec)) {
    return absl::NotFoundError(
        absl::StrCat("model folder '", folder, "' does not exist or is not a directory"));
  }
  const fs::path config_path = fs::path(folder) / "config.json";
  std::ifstream in(config_path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("'", folder,
                     "' is not a model folder: it has no config.json (expected a Hugging Face "
                     "model folder with config.json, model.safetensors and tokenizer files)"));
  }
  std::stringstream text;
  text << in.rdbuf();
  return Parse(text.str(), config_path.string());
}

}  // namespace lorad::engine
