#include "engine/model/model_config.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/json_file.h"
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

// A field of the wrong JSON type ("rms_norm_eps": "1e-6"); Parse turns it into an error that
// names the field.
struct WrongType {
  std::string key;
  std::string expected;
};

template <typename T>
T Optional(const json& j, const std::string& key, T fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  try {
    return it->get<T>();
  } catch (const json::type_error&) {
    throw WrongType{key, std::is_same_v<T, bool>          ? "true or false"
                         : std::is_same_v<T, std::string> ? "a string"
                                                          : "a number"};
  }
}

// A field transformers requires for this rope type.
template <typename T>
absl::StatusOr<T> RequiredRopeField(const json& params, const std::string& source,
                                    const std::string& key) {
  auto it = params.find(key);
  if (it == params.end() || it->is_null()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": the llama3 rope parameters need '",
                                                   key, "' (transformers requires it too)"));
  }
  return Optional<T>(params, key, T{});
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

absl::StatusOr<RopeConfig> ParseRope(const json& j, const std::string& source,
                                     int64_t max_position_embeddings) {
  RopeConfig rope;
  rope.theta = Optional<double>(j, "rope_theta", rope.theta);
  // transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters, and
  // reads rope_scaling first when a file has both (a scaling added by hand to a saved config).
  const json* params = nullptr;
  std::string field;
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    if (j.contains(key) && j[key].is_object() && !j[key].empty()) {
      params = &j[key];
      field = key;
      break;
    }
  }
  if (params == nullptr) return rope;
  rope.theta = Optional<double>(*params, "rope_theta", rope.theta);
  rope.type = Optional<std::string>(*params, "rope_type",
                                    Optional<std::string>(*params, "type", "default"));
  if (rope.type == "default") return rope;
  if (rope.type != "llama3") {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": ", field, ".", params->contains("rope_type") ? "rope_type" : "type", " '",
        rope.type,
        "' is not supported (supported: default, llama3); lorad cannot serve this model's "
        "positions exactly: pick a model without that context extension"));
  }
  for (auto [field, key] :
       {std::pair{&rope.factor, "factor"}, std::pair{&rope.low_freq_factor, "low_freq_factor"},
        std::pair{&rope.high_freq_factor, "high_freq_factor"}}) {
    auto v = RequiredRopeField<double>(*params, source, key);
    if (!v.ok()) return v.status();
    *field = *v;
  }
  // transformers: a top-level original_max_position_embeddings first (Phi-3 style configs),
  // then the one in the scaling, then the model's own max_position_embeddings.
  rope.original_max_position_embeddings = Optional<int64_t>(
      j, "original_max_position_embeddings",
      Optional<int64_t>(*params, "original_max_position_embeddings", max_position_embeddings));
  return rope;
}

// The window of the layers that slide, as transformers decides it; 0 when none does. Llama never
// slides; Mistral's and Qwen2's windows are 4096 when the key is absent (null: none).
int64_t SlidingWindow(const json& j, const ModelConfig& c) {
  if (c.architecture == "LlamaForCausalLM") return 0;
  const int64_t window =
      j.contains("sliding_window") ? Optional<int64_t>(j, "sliding_window", 0) : 4096;
  if (window <= 0) return 0;
  if (c.architecture == "Qwen2ForCausalLM" && !Optional<bool>(j, "use_sliding_window", false)) {
    return 0;
  }
  if (j.contains("layer_types") && j["layer_types"].is_array()) {
    for (const auto& t : j["layer_types"]) {
      if (t.is_string() && t.get<std::string>() == "sliding_attention") return window;
    }
    return 0;
  }
  if (c.architecture == "Qwen2ForCausalLM") {
    // Layers from max_window_layers (transformers' default 28) on slide.
    return Optional<int64_t>(j, "max_window_layers", 28) < c.num_hidden_layers ? window : 0;
  }
  return window;  // Mistral: every layer
}

absl::StatusOr<ModelConfig> ParseFields(const json& j, const std::string& source) {
  ModelConfig c;
  if (j.contains("quantization_config") && j["quantization_config"].is_object()) {
    const json& q = j["quantization_config"];
    const std::string method = Optional<std::string>(q, "quant_method", "bitsandbytes");
    const bool eight_bit = Optional<bool>(q, "load_in_8bit", false);
    if (method != "bitsandbytes" || eight_bit) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": quantization_config says '", method, eight_bit ? " 8-bit" : "",
                       "'; lorad reads 16/32-bit checkpoints (and quantizes them to NF4 itself) or "
                       "bitsandbytes 4-bit ones: point it at the unquantized model folder"));
    }
    // bitsandbytes 4-bit as lorad reads it: NF4 with double quantization (the -bnb-4bit
    // downloads); transformers' default BitsAndBytesConfig(load_in_4bit=True) is FP4 without.
    const std::string type = Optional<std::string>(q, "bnb_4bit_quant_type", "nf4");
    const bool double_quant = Optional<bool>(q, "bnb_4bit_use_double_quant", true);
    if (type != "nf4" || !double_quant) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": quantization_config says bitsandbytes 4-bit '", type, "'",
          double_quant ? "" : " without double quantization",
          "; lorad reads bitsandbytes NF4 with double quantization, or 16/32-bit checkpoints (it "
          "quantizes them to NF4 itself): point it at the unquantized model folder"));
    }
  }
  // MLX's quantized folders (mlx-community's -4bit) say so in a "quantization" object.
  if (j.contains("quantization") && j["quantization"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": the checkpoint is quantized by MLX ('quantization' ", j["quantization"].dump(),
        "); lorad reads 16/32-bit checkpoints (and quantizes them to "
        "NF4 itself) or bitsandbytes 4-bit ones: point it at the unquantized model folder"));
  }
  // transformers falls back on model_type when there is no architectures list.
  static const std::map<std::string, std::string> kByModelType = {{"llama", "LlamaForCausalLM"},
                                                                  {"mistral", "MistralForCausalLM"},
                                                                  {"qwen2", "Qwen2ForCausalLM"}};
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string()) {
    c.architecture = j["architectures"][0].get<std::string>();
  } else if (auto it = kByModelType.find(Optional<std::string>(j, "model_type", ""));
             it != kByModelType.end()) {
    c.architecture = it->second;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field 'architectures' is missing; expected one of ",
                     absl::StrJoin(SupportedArchitectures(), ", ")));
  }
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
  // transformers' defaults when a key is absent (null: as many as the attention heads).
  const bool qwen2 = c.architecture == "Qwen2ForCausalLM";
  const bool mistral = c.architecture == "MistralForCausalLM";
  c.num_key_value_heads = j.contains("num_key_value_heads")
                              ? Optional<int64_t>(j, "num_key_value_heads", c.num_attention_heads)
                              : (qwen2     ? 32
                                 : mistral ? 8
                                           : c.num_attention_heads);
  if (!j.contains("head_dim") && c.num_attention_heads > 0 &&
      c.hidden_size % c.num_attention_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": hidden_size (", c.hidden_size, ") is not a multiple of num_attention_heads (",
        c.num_attention_heads, ") and no head_dim is given"));
  }
  c.head_dim = Optional<int64_t>(j, "head_dim", c.hidden_size / c.num_attention_heads);
  c.max_position_embeddings = Optional<int64_t>(j, "max_position_embeddings",
                                                qwen2     ? 32768
                                                : mistral ? 131072
                                                          : 2048);
  c.rms_norm_eps = Optional<double>(j, "rms_norm_eps", c.rms_norm_eps);
  c.tie_word_embeddings = Optional<bool>(j, "tie_word_embeddings", false);
  // Qwen2's q/k/v always have a bias in transformers, whatever attention_bias says.
  c.attention_bias = qwen2 || Optional<bool>(j, "attention_bias", false);
  c.mlp_bias = Optional<bool>(j, "mlp_bias", false);
  c.hidden_act = Optional<std::string>(j, "hidden_act", c.hidden_act);
  if (c.hidden_act == "swish") c.hidden_act = "silu";  // the same function (transformers' ACT2FN)
  c.torch_dtype =
      Optional<std::string>(j, "torch_dtype", Optional<std::string>(j, "dtype", "float32"));
  c.bos_token_ids = TokenIds(j, "bos_token_id");
  c.eos_token_ids = TokenIds(j, "eos_token_id");

  auto rope = ParseRope(j, source, c.max_position_embeddings);
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
  c.sliding_window = SlidingWindow(j, c);
  if (c.sliding_window > 0 && c.sliding_window < c.max_position_embeddings) {
    c.max_position_embeddings = c.sliding_window;
  } else {
    c.sliding_window = 0;  // no sequence can outgrow it
  }
  return c;
}

}  // namespace

const std::vector<std::string>& SupportedArchitectures() {
  static const std::vector<std::string> kArchitectures = {"LlamaForCausalLM", "MistralForCausalLM",
                                                          "Qwen2ForCausalLM"};
  return kArchitectures;
}

absl::StatusOr<ModelConfig> ModelConfig::Parse(const std::string& json_text,
                                               const std::string& source) {
  if (auto s = CheckJsonNesting(json_text, source); !s.ok()) return s;
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  }
  try {
    return ParseFields(j, source);
  } catch (const WrongType& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field '", e.key, "' must be ", e.expected));
  }
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
    const int err = errno;
    // There but not readable (another user's mode 0600 files, as a container's user meets them),
    // or a symlink to nothing (a Hugging Face cache snapshot mounted without its blobs/ folder):
    // "no config.json" sent users to look for a file `ls` shows them.
    if (fs::is_symlink(fs::symlink_status(config_path, ec)) && !fs::exists(config_path, ec)) {
      return absl::NotFoundError(absl::StrCat(
          "model folder '", folder, "': config.json is a symlink to ",
          fs::read_symlink(config_path, ec).string(),
          ", which does not exist here (a Hugging Face cache snapshot links into the cache's "
          "blobs/ folder: download with --local-dir, or make the whole cache visible)"));
    }
    if (fs::exists(fs::symlink_status(config_path, ec))) {
      return absl::PermissionDeniedError(absl::StrCat(
          "model folder '", folder, "': config.json cannot be read (", std::strerror(err),
          "): make the model's files readable by the user lorad runs as"));
    }
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
