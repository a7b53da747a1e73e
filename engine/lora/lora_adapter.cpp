#include "engine/lora/lora_adapter.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/model/json_file.h"
#include "engine/model/safetensors.h"
#include "engine/runtime/durable_file.h"
#include "nlohmann/json.hpp"
#include "re2/re2.h"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

constexpr const char* kConfigFile = "adapter_config.json";
constexpr const char* kWeightsFile = "adapter_model.safetensors";
// PEFT prefixes every key with the wrapper modules' names: PeftModel.base_model (LoraModel)
// .model (the transformers model).
constexpr const char* kKeyPrefix = "base_model.model.";
// PEFT's defaults for fields an adapter_config.json leaves out (peft/tuners/lora/config.py).
constexpr int kPeftDefaultRank = 8;
constexpr double kPeftDefaultAlpha = 8;

// One targeted projection: "model.layers.{layer}.{self_attn|mlp}.{projection}".
struct ModulePath {
  int64_t layer = 0;
  std::string projection;
};

bool IsAttentionProjection(const std::string& projection) {
  return projection == "q_proj" || projection == "k_proj" || projection == "v_proj" ||
         projection == "o_proj";
}

std::string ModulePathFor(int64_t layer, const std::string& projection) {
  return absl::StrCat("model.layers.", layer,
                      IsAttentionProjection(projection) ? ".self_attn." : ".mlp.", projection);
}

absl::StatusOr<ModulePath> ParseModulePath(const std::string& path) {
  const auto& known = KnownLoraTargets();
  std::vector<std::string> parts = absl::StrSplit(path, '.');
  ModulePath m;
  if (parts.size() == 5 && parts[0] == "model" && parts[1] == "layers" &&
      absl::SimpleAtoi(parts[2], &m.layer) && m.layer >= 0 &&
      std::find(known.begin(), known.end(), parts[4]) != known.end()) {
    m.projection = parts[4];
    if (ModulePathFor(m.layer, m.projection) == path) return m;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "module '", path,
      "' is not a LoRA target lorad supports (model.layers.<i>.self_attn.{q,k,v,o}_proj or "
      "model.layers.<i>.mlp.{gate,up,down}_proj)"));
}

std::string PeftKey(const std::string& module_path, char factor) {
  return absl::StrCat(kKeyPrefix, module_path, ".lora_", std::string(1, factor), ".weight");
}

// in/out features of a projection, with the config fields they come from for error messages.
struct Features {
  int64_t in = 0;
  int64_t out = 0;
  std::string why;
};

Features ProjectionFeatures(const ModelConfig& m, const std::string& projection) {
  const int64_t head_dim = m.head_dim > 0 ? m.head_dim : m.hidden_size / m.num_attention_heads;
  const int64_t q = m.num_attention_heads * head_dim;
  const int64_t kv = m.num_key_value_heads * head_dim;
  const std::string h = absl::StrCat("hidden_size ", m.hidden_size);
  if (projection == "q_proj") {
    return {m.hidden_size, q, absl::StrCat(h, " -> num_attention_heads x head_dim ", q)};
  }
  if (projection == "k_proj" || projection == "v_proj") {
    return {m.hidden_size, kv, absl::StrCat(h, " -> num_key_value_heads x head_dim ", kv)};
  }
  if (projection == "o_proj") {
    return {q, m.hidden_size, absl::StrCat("num_attention_heads x head_dim ", q, " -> ", h)};
  }
  const std::string inter = absl::StrCat("intermediate_size ", m.intermediate_size);
  if (projection == "down_proj") {
    return {m.intermediate_size, m.hidden_size, absl::StrCat(inter, " -> ", h)};
  }
  return {m.hidden_size, m.intermediate_size, absl::StrCat(h, " -> ", inter)};  // gate, up
}

std::string ShapeString(const torch::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]");
}

template <typename T>
bool Contains(const std::vector<T>& v, const T& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

std::string ErrnoText() { return std::strerror(errno); }

// ---- adapter_config.json ----

absl::Status ConfigError(const std::string& file, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(file, ": ", what));
}

// target_modules: a list of names, or one name. PEFT also takes a regex string (matched against
// full module paths); lorad reads only plain names so it knows exactly which layers are adapted.
absl::StatusOr<std::vector<std::string>> ParseTargets(const ordered_json& j,
                                                      const std::string& file) {
  auto it = j.find("target_modules");
  const std::string known = absl::StrJoin(KnownLoraTargets(), ", ");
  if (it == j.end() || it->is_null()) {
    return ConfigError(
        file, absl::StrCat("field 'target_modules' is missing; expected a list of ", known));
  }
  std::vector<std::string> names;
  if (it->is_string()) {
    const std::string s = it->get<std::string>();
    if (!Contains(KnownLoraTargets(), s)) {
      return ConfigError(
          file, absl::StrCat("field 'target_modules' is the pattern '", s,
                             "'; lorad does not read regex targets: list the projections (", known,
                             ") instead"));
    }
    return std::vector<std::string>{s};
  }
  if (!it->is_array()) {
    return ConfigError(file, "field 'target_modules' must be a list of module names");
  }
  for (const auto& v : *it) {
    if (!v.is_string()) {
      return ConfigError(file, "field 'target_modules' must be a list of module names");
    }
    // PEFT matches a name against the end of a module path, so "self_attn.q_proj" means q_proj.
    std::string name = v.get<std::string>();
    const std::string last = name.substr(name.rfind('.') + 1);
    if (!Contains(KnownLoraTargets(), last)) {
      return ConfigError(file, absl::StrCat("field 'target_modules' has '", name,
                                            "', which lorad cannot adapt (known: ", known, ")"));
    }
    if (!Contains(names, last)) names.push_back(last);
  }
  return names;
}

// Features PEFT has that lorad's LoRA math does not implement: reading such an adapter would
// silently change its outputs, so each is an error.
absl::Status CheckUnsupported(const ordered_json& j, const std::string& file) {
  auto not_supported = [&](const std::string& field, const std::string& value) {
    return ConfigError(
        file, absl::StrCat("field '", field, "' is ", value, ", which lorad does not support"));
  };
  for (const char* field : {"use_dora", "lora_bias", "fan_in_fan_out"}) {
    auto it = j.find(field);
    if (it != j.end() && !it->is_null() && !(it->is_boolean() && !it->get<bool>())) {
      return not_supported(field, it->dump());
    }
  }
  auto bias = j.find("bias");
  if (bias != j.end() && !bias->is_null() &&
      !(bias->is_string() && bias->get<std::string>() == "none")) {
    return not_supported("bias", absl::StrCat(bias->dump(), " (only \"none\")"));
  }
  auto save = j.find("modules_to_save");
  if (save != j.end() && !save->is_null() && !(save->is_array() && save->empty())) {
    return not_supported("modules_to_save", save->dump());
  }
  // Variants whose forward is not base + scale * B A on every token (activated LoRA, replicated
  // or reordered layers, trainable token rows, block-diagonal and KaSA updates, Arrow routing,
  // parameter targets, MonteCLoRA): served as plain LoRA they would give other output than PEFT.
  for (const char* field :
       {"alora_invocation_tokens", "layer_replication", "trainable_token_indices",
        "target_parameters", "use_bdlora", "kasa_config", "arrow_config", "monteclora_config"}) {
    auto it = j.find(field);
    const bool unset = it == j.end() || it->is_null() || (it->is_boolean() && !it->get<bool>()) ||
                       ((it->is_array() || it->is_object()) && it->empty());
    if (!unset) return not_supported(field, it->dump());
  }
  // Inits that move part of the base weights into the adapter: PEFT rebuilds that base when it
  // loads such an adapter; lorad serves every adapter on the unchanged base.
  auto init = j.find("init_lora_weights");
  if (init != j.end() && init->is_string()) {
    const std::string name = init->get<std::string>();
    // As PEFT tells them apart: by prefix, and OLoRA in any case ("OLoRA" is its own spelling).
    bool changes_base = absl::AsciiStrToLower(name) == "olora";
    for (const char* prefix : {"pissa", "olora", "loftq", "corda", "lora_ga"}) {
      changes_base |= absl::StartsWith(name, prefix);
    }
    if (changes_base) {
      return ConfigError(
          file, absl::StrCat("field 'init_lora_weights' is \"", name,
                             "\": that init changes the base weights, and lorad serves adapters "
                             "on the unchanged base; convert it to a plain LoRA adapter first "
                             "(PEFT: save_pretrained(..., "
                             "path_initial_model_for_weight_conversion=...))"));
    }
  }
  return absl::OkStatus();
}

// rank_pattern / alpha_pattern: per-module ranks and alphas, keyed by Python regular expressions
// that PEFT matches against the end of a module's name (peft.utils.other.get_pattern_key), the
// first key in the file's order that matches winning.
struct ModulePattern {
  std::string key;
  std::shared_ptr<const RE2> matcher;  // (.*\.)?(key), matched against the whole module name
  double value = 0;
};
struct ModulePatterns {
  std::vector<ModulePattern> rank, alpha;
  std::vector<int64_t> layers;  // layers_to_transform: the only layers adapted; empty = all
};

absl::StatusOr<std::vector<ModulePattern>> ParsePattern(const ordered_json& j, const char* field,
                                                        const std::string& file) {
  std::vector<ModulePattern> out;
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return out;
  if (!it->is_object())
    return ConfigError(file, absl::StrCat("field '", field, "' must be an object"));
  for (const auto& [key, value] : it->items()) {
    if (!value.is_number()) {
      return ConfigError(file, absl::StrCat("field '", field, "': '", key, "' must be a number"));
    }
    auto matcher = std::make_shared<const RE2>(absl::StrCat("(.*\\.)?(", key, ")"));
    if (!matcher->ok()) {
      return ConfigError(file, absl::StrCat("field '", field, "': '", key,
                                            "' is not a regular expression lorad can read"));
    }
    out.push_back({key, std::move(matcher), value.get<double>()});
  }
  return out;
}

// The value of the first pattern that matches `module` (PEFT: re.match(rf"(.*\.)?({key})$")).
std::optional<double> PatternValue(const std::vector<ModulePattern>& patterns,
                                   const std::string& module) {
  for (const ModulePattern& p : patterns) {
    if (RE2::FullMatch(module, *p.matcher)) return p.value;
  }
  return std::nullopt;
}

absl::StatusOr<LoraConfig> ParseConfig(const std::string& text, const std::string& file,
                                       ModulePatterns* patterns) {
  if (auto s = CheckJsonNesting(text, file); !s.ok()) return s;
  ordered_json j;
  try {
    j = ordered_json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    // e.what() names the byte offset and what the parser expected there.
    return ConfigError(file, absl::StrCat("not valid JSON: ", e.what()));
  }
  if (!j.is_object()) return ConfigError(file, "not a JSON object");
  auto type = j.find("peft_type");
  if (type == j.end() || !type->is_string()) {
    return ConfigError(file, "field 'peft_type' is missing: not a PEFT adapter config");
  }
  if (type->get<std::string>() != "LORA") {
    return ConfigError(file, absl::StrCat("field 'peft_type' is '", type->get<std::string>(),
                                          "'; lorad reads LoRA adapters only (\"LORA\")"));
  }
  if (auto s = CheckUnsupported(j, file); !s.ok()) return s;

  LoraConfig c;
  c.r = kPeftDefaultRank;
  c.alpha = kPeftDefaultAlpha;
  c.dropout = 0;
  if (auto it = j.find("r"); it != j.end()) {
    if (!it->is_number_integer()) return ConfigError(file, "field 'r' must be an integer");
    const int64_t r = it->get<int64_t>();
    if (r < 1 || r > 1024) {  // checked before narrowing; Validate() words the message
      return ConfigError(file, absl::StrCat("field 'r' must be in [1, 1024], got ", r));
    }
    c.r = static_cast<int>(r);
  }
  if (auto it = j.find("lora_alpha"); it != j.end()) {
    if (!it->is_number()) return ConfigError(file, "field 'lora_alpha' must be a number");
    c.alpha = it->get<double>();
  }
  if (auto it = j.find("lora_dropout"); it != j.end() && !it->is_null()) {
    if (!it->is_number()) return ConfigError(file, "field 'lora_dropout' must be a number");
    c.dropout = it->get<double>();
  }
  if (auto it = j.find("use_rslora"); it != j.end() && !it->is_null()) {
    if (!it->is_boolean()) return ConfigError(file, "field 'use_rslora' must be true or false");
    c.use_rslora = it->get<bool>();
  }
  if (auto it = j.find("base_model_name_or_path"); it != j.end() && it->is_string()) {
    c.base_model_name_or_path = it->get<std::string>();
  }
  auto targets = ParseTargets(j, file);
  if (!targets.ok()) return targets.status();
  c.target_modules = *targets;
  auto rank = ParsePattern(j, "rank_pattern", file);
  if (!rank.ok()) return rank.status();
  auto alpha = ParsePattern(j, "alpha_pattern", file);
  if (!alpha.ok()) return alpha.status();
  for (const ModulePattern& p : *rank) {
    if (p.value != std::floor(p.value) || p.value < 1 || p.value > 1024) {
      return ConfigError(file, absl::StrCat("field 'rank_pattern': '", p.key, "' is ", p.value,
                                            "; ranks are whole numbers in [1, 1024]"));
    }
  }
  for (const ModulePattern& p : *alpha) {
    if (!(p.value > 0 && p.value <= kMaxLoraAlpha)) {
      return ConfigError(file, absl::StrCat("field 'alpha_pattern': '", p.key, "' is ", p.value,
                                            "; alphas are in (0, ", kMaxLoraAlpha, "]"));
    }
  }
  patterns->rank = *std::move(rank);
  patterns->alpha = *std::move(alpha);
  // layers_to_transform: PEFT adapts only the layers listed (one index or a list).
  if (auto it = j.find("layers_to_transform"); it != j.end() && !it->is_null()) {
    const ordered_json list = it->is_array() ? *it : ordered_json::array({*it});
    for (const auto& v : list) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0) {
        return ConfigError(file,
                           "field 'layers_to_transform' must be a layer index or a list of "
                           "layer indices");
      }
      patterns->layers.push_back(v.get<int64_t>());
    }
  }
  if (auto s = c.Validate(); !s.ok()) return ConfigError(file, std::string(s.message()));
  return c;
}

// The adapter_config.json PEFT 0.21 writes for a LoRA adapter, field for field (sorted keys,
// indent 2, as PEFT's save_pretrained), so PEFT loads it with the same settings it would have
// saved. peft_version is left out: PEFT fills in its own version when it loads the file.
std::string ConfigJson(const LoraConfig& c) {
  ordered_json j;
  auto null = ordered_json();
  auto empty = ordered_json::object();
  j["alora_invocation_tokens"] = null;
  j["alpha_pattern"] = empty;
  j["arrow_config"] = null;
  j["auto_mapping"] = null;
  j["base_model_name_or_path"] =
      c.base_model_name_or_path.empty() ? null : ordered_json(c.base_model_name_or_path);
  j["bias"] = "none";
  j["corda_config"] = null;
  j["ensure_weight_tying"] = false;
  j["eva_config"] = null;
  j["exclude_modules"] = null;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["kasa_config"] = null;
  j["layer_replication"] = null;
  j["layers_pattern"] = null;
  j["layers_to_transform"] = null;
  j["loftq_config"] = empty;
  // PEFT keeps lora_alpha an int when it was given one.
  if (c.alpha == std::floor(c.alpha) && std::abs(c.alpha) < 1e15) {
    j["lora_alpha"] = static_cast<int64_t>(c.alpha);
  } else {
    j["lora_alpha"] = c.alpha;
  }
  j["lora_bias"] = false;
  j["lora_dropout"] = c.dropout;
  j["lora_ga_config"] = null;
  j["megatron_config"] = null;
  j["megatron_core"] = "megatron.core";
  j["modules_to_save"] = null;
  j["monteclora_config"] = null;
  j["peft_type"] = "LORA";
  j["qalora_group_size"] = 16;
  j["r"] = c.r;
  j["rank_pattern"] = empty;
  j["revision"] = null;
  j["target_modules"] = c.target_modules;
  j["target_parameters"] = null;
  j["task_type"] = "CAUSAL_LM";
  j["trainable_token_indices"] = null;
  j["use_bdlora"] = null;
  j["use_dora"] = false;
  j["use_qalora"] = false;
  j["use_rslora"] = c.use_rslora;
  j["velora_config"] = null;
  return j.dump(2);
}

// ---- adapter_model.safetensors ----

// Splits "base_model.model.<path>.lora_A[.<adapter name>].weight" into path and 'A'/'B'. PEFT
// saves without the adapter name; older tools kept it (".lora_A.default.weight").
bool ParsePeftKey(const std::string& key, std::string* module_path, char* factor) {
  if (!absl::StartsWith(key, kKeyPrefix) || !absl::EndsWith(key, ".weight")) return false;
  for (char f : {'A', 'B'}) {
    const std::string marker = absl::StrCat(".lora_", std::string(1, f), ".");
    const size_t pos = key.rfind(marker);
    if (pos == std::string::npos) continue;
    const std::string rest = key.substr(pos + marker.size());  // "weight" or "<name>.weight"
    const size_t dot = rest.find('.');
    if (rest != "weight" &&
        (dot == 0 || dot == std::string::npos || rest.substr(dot) != ".weight")) {
      return false;
    }
    *module_path = key.substr(std::strlen(kKeyPrefix), pos - std::strlen(kKeyPrefix));
    *factor = f;
    return true;
  }
  return false;
}

// Copies a mapped tensor into an owned fp32 tensor (the mapping may be unaligned or go away).
absl::StatusOr<torch::Tensor> ToFloatTensor(const TensorView& v, const std::string& file) {
  torch::ScalarType type;
  switch (v.dtype) {
    case DType::kF32:
      type = torch::kFloat32;
      break;
    case DType::kF16:
      type = torch::kFloat16;
      break;
    case DType::kBF16:
      type = torch::kBFloat16;
      break;
    case DType::kF64:
      type = torch::kFloat64;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": tensor '", v.name, "' has dtype ", DTypeName(v.dtype),
                       "; LoRA weights must be F32, F16, BF16 or F64"));
  }
  if (v.shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": tensor '", v.name, "' has ",
                                                   v.shape.size(), " dimensions; expected 2"));
  }
  torch::Tensor t = torch::empty(v.shape, torch::TensorOptions().dtype(type));
  if (v.nbytes > 0) std::memcpy(t.data_ptr(), v.data, v.nbytes);
  t = t.to(torch::kFloat32);
  if (!torch::isfinite(t).all().item<bool>()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": tensor '", v.name, "' holds NaN or infinite values"));
  }
  return t;
}

// ---- writing a folder atomically ----

// A folder may be replaced only when it is empty or already an adapter: never a user's folder
// that happens to have the name.
bool ReplaceableFolder(const fs::path& folder) {
  std::error_code ec;
  return fs::is_empty(folder, ec) || fs::exists(folder / kConfigFile, ec);
}

}  // namespace

absl::StatusOr<LoraAdapter> LoraAdapter::Init(const ModelConfig& model, const LoraConfig& config,
                                              uint64_t seed) {
  if (auto s = config.Validate(); !s.ok()) return s;
  if (model.num_hidden_layers <= 0 || model.hidden_size <= 0 || model.num_attention_heads <= 0) {
    return absl::InvalidArgumentError("LoraAdapter::Init: the model config has no layers");
  }
  try {
    LoraAdapter adapter;
    adapter.config = config;
    // One generator walked in a fixed order (layer, then the projection order of
    // KnownLoraTargets), so the weights depend on the seed only, not on how targets are listed.
    at::Generator gen = at::detail::createCPUGenerator(seed);
    torch::NoGradGuard no_grad;
    for (int64_t layer = 0; layer < model.num_hidden_layers; ++layer) {
      for (const auto& projection : KnownLoraTargets()) {
        if (!Contains(config.target_modules, projection)) continue;
        const Features f = ProjectionFeatures(model, projection);
        // kaiming_uniform_(a=sqrt(5)) on [r, in]: gain sqrt(2 / (1 + 5)), bound
        // gain * sqrt(3 / fan_in) = 1 / sqrt(in_features), as torch.nn.Linear and PEFT.
        const double bound = 1.0 / std::sqrt(static_cast<double>(f.in));
        LoraPair pair;
        pair.a = torch::empty({config.r, f.in}, torch::kFloat32);
        pair.a.uniform_(-bound, bound, gen);
        // B = 0 makes the adapted model equal the base model at step 0.
        pair.b = torch::zeros({f.out, config.r}, torch::kFloat32);
        adapter.layers.emplace(ModulePathFor(layer, projection), std::move(pair));
      }
    }
    return adapter;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("LoraAdapter::Init: ", e.what_without_backtrace()));
  }
}

namespace {

// An adapter with per-module ranks and alphas, made one that every module shares: the largest
// rank, the smaller ones padded with zero rows of A and zero columns of B (which add nothing),
// and each module's scaling folded into its B, so that scaling() * B' A' equals the module's own
// scaling * B A. Serving then needs one rank and one scale per adapter.
absl::Status MakeUniform(LoraAdapter& adapter, const ModulePatterns& patterns) {
  LoraConfig& c = adapter.config;
  int64_t max_rank = 0;
  for (const auto& [path, pair] : adapter.layers) max_rank = std::max(max_rank, pair.a.size(0));
  const double alpha = c.alpha;
  auto module_scaling = [&](const std::string& path, int64_t r) {
    LoraConfig m = c;
    m.r = static_cast<int>(r);
    m.alpha = PatternValue(patterns.alpha, path).value_or(alpha);
    return m.scaling();
  };
  c.r = static_cast<int>(max_rank);
  if (auto s = c.Validate(); !s.ok()) return s;
  for (auto& [path, pair] : adapter.layers) {
    const int64_t r = pair.a.size(0);
    const double factor = module_scaling(path, r) / c.scaling();
    if (r < max_rank) {
      pair.a = torch::cat({pair.a, torch::zeros({max_rank - r, pair.a.size(1)}, pair.a.options())});
      pair.b =
          torch::cat({pair.b, torch::zeros({pair.b.size(0), max_rank - r}, pair.b.options())}, 1);
    }
    if (factor != 1.0) pair.b = pair.b * factor;
  }
  adapter.from_patterns = true;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LoraAdapter> LoraAdapter::ReadPeft(const std::string& folder) {
  std::error_code ec;
  if (!fs::is_directory(folder, ec)) {
    return absl::NotFoundError(
        absl::StrCat("adapter folder '", folder, "' does not exist or is not a directory"));
  }
  const std::string config_path = (fs::path(folder) / kConfigFile).string();
  if (fs::exists(config_path, ec)) {
    if (auto s = RequireRegularFile(config_path, absl::StrCat("'", config_path, "'")); !s.ok()) {
      return s;
    }
  }
  std::ifstream in(config_path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("'", folder, "' is not a PEFT adapter folder: it has no ", kConfigFile));
  }
  std::stringstream text;
  text << in.rdbuf();
  ModulePatterns patterns;
  auto config = ParseConfig(text.str(), config_path, &patterns);
  if (!config.ok()) return config.status();

  const std::string weights_path = (fs::path(folder) / kWeightsFile).string();
  if (!fs::exists(weights_path, ec)) {
    const bool pickle = fs::exists(fs::path(folder) / "adapter_model.bin", ec);
    return absl::NotFoundError(absl::StrCat(
        "'", folder, "' has no ", kWeightsFile,
        pickle ? " (only adapter_model.bin: lorad does not read pickle files; re-save the adapter "
                 "with safe_serialization=True)"
               : ""));
  }
  // Read, not mapped: the folder is the operator's or a client's, and may be rewritten meanwhile.
  auto file = SafetensorsFile::Open(weights_path, SafetensorsFile::Access::kRead);
  if (!file.ok()) return file.status();

  try {
    LoraAdapter adapter;
    adapter.config = *config;
    std::map<std::string, torch::Tensor> a_factors, b_factors;
    for (const TensorView& v : (*file)->tensors()) {
      std::string path;
      char factor = 0;
      if (!ParsePeftKey(v.name, &path, &factor)) {
        return absl::InvalidArgumentError(absl::StrCat(
            weights_path, ": tensor '", v.name,
            "' is not a LoRA weight (expected base_model.model.<module>.lora_A.weight or "
            ".lora_B.weight)"));
      }
      auto module = ParseModulePath(path);
      if (!module.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": tensor '", v.name, "': ", module.status().message()));
      }
      if (!Contains(config->target_modules, module->projection)) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": tensor '", v.name, "' adapts ", module->projection,
                         ", which target_modules in ", kConfigFile, " does not list"));
      }
      // PEFT would leave such a tensor unused; serving it would change the output.
      if (!patterns.layers.empty() && !Contains(patterns.layers, module->layer)) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": tensor '", v.name, "' adapts layer ", module->layer,
                         ", which layers_to_transform in ", kConfigFile, " does not list"));
      }
      auto t = ToFloatTensor(v, weights_path);
      if (!t.ok()) return t.status();
      // A is [r, in], B is [out, r]; the rank side must be the module's r (rank_pattern's, or
      // the config's).
      const int64_t module_r = static_cast<int64_t>(
          PatternValue(patterns.rank, path).value_or(static_cast<double>(config->r)));
      const int64_t rank = factor == 'A' ? t->size(0) : t->size(1);
      if (rank != module_r) {
        return absl::InvalidArgumentError(absl::StrCat(
            weights_path, ": tensor '", v.name, "' has shape ", ShapeString(*t), " but r is ",
            module_r, " in ", kConfigFile,
            factor == 'A' ? " (lora_A is [r, in_features])" : " (lora_B is [out_features, r])"));
      }
      auto& factors = factor == 'A' ? a_factors : b_factors;
      if (!factors.emplace(path, *t).second) {
        return absl::InvalidArgumentError(absl::StrCat(weights_path, ": ", path, " has two lora_",
                                                       std::string(1, factor), " tensors"));
      }
    }
    for (const auto& [path, a] : a_factors) {
      auto b = b_factors.find(path);
      if (b == b_factors.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": ", PeftKey(path, 'A'), " has no matching lora_B tensor"));
      }
      adapter.layers[path] = LoraPair{a, b->second};
    }
    for (const auto& [path, b] : b_factors) {
      if (!a_factors.count(path)) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": ", PeftKey(path, 'B'), " has no matching lora_A tensor"));
      }
    }
    if (adapter.layers.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(weights_path, ": holds no LoRA weights"));
    }
    if (!patterns.rank.empty() || !patterns.alpha.empty()) {
      if (auto s = MakeUniform(adapter, patterns); !s.ok()) {
        return ConfigError(config_path, std::string(s.message()));
      }
    }
    return adapter;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("reading ", weights_path, ": ", e.what_without_backtrace()));
  }
}

absl::Status LoraAdapter::WritePeft(const std::string& folder) const {
  if (auto s = config.Validate(); !s.ok()) return s;
  if (layers.empty()) return absl::InvalidArgumentError("LoRA adapter has no layers to write");
  // Owned contiguous fp32 CPU copies: the views below point into them.
  std::vector<torch::Tensor> keep;
  std::vector<TensorView> views;
  try {
    for (const auto& [path, pair] : layers) {
      auto module = ParseModulePath(path);
      if (!module.ok()) return module.status();
      if (!Contains(config.target_modules, module->projection)) {
        return absl::InvalidArgumentError(absl::StrCat("LoRA adapter has layer ", path,
                                                       " but target_modules does not list ",
                                                       module->projection));
      }
      for (char factor : {'A', 'B'}) {
        const torch::Tensor& t = factor == 'A' ? pair.a : pair.b;
        const std::string key = PeftKey(path, factor);
        if (!t.defined() || t.dim() != 2 || (factor == 'A' ? t.size(0) : t.size(1)) != config.r) {
          return absl::InvalidArgumentError(absl::StrCat(
              "LoRA tensor ", key, " has shape ", t.defined() ? ShapeString(t) : "(undefined)",
              "; expected ", factor == 'A' ? "[r, in_features]" : "[out_features, r]", " with r ",
              config.r));
        }
        keep.push_back(t.detach().to(torch::kCPU, torch::kFloat32).contiguous());
        TensorView v;
        v.name = key;
        v.dtype = DType::kF32;
        v.shape = keep.back().sizes().vec();
        v.data = static_cast<const uint8_t*>(keep.back().data_ptr());
        v.nbytes = keep.back().nbytes();
        views.push_back(std::move(v));
      }
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("writing adapter ", folder, ": ", e.what_without_backtrace()));
  }

  std::error_code ec;
  fs::path target = fs::absolute(folder, ec).lexically_normal();
  if (!target.has_filename()) target = target.parent_path();  // "out/adapter/"
  const fs::path parent = target.parent_path();
  fs::create_directories(parent, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create folder ", parent.string(), ": ", ec.message()));
  }
  const bool replace = fs::exists(target, ec);
  if (replace && (!fs::is_directory(target, ec) || !ReplaceableFolder(target))) {
    return absl::AlreadyExistsError(absl::StrCat(
        target.string(), " exists and is not an adapter folder; refusing to replace it"));
  }
  std::string temp =
      (parent / absl::StrCat(".", target.filename().string(), ".tmp-XXXXXX")).string();
  if (::mkdtemp(temp.data()) == nullptr) {
    return absl::InternalError(
        absl::StrCat("cannot create a temporary folder in ", parent.string(), ": ", ErrnoText()));
  }
  auto cleanup = [&](absl::Status s) {
    std::error_code ignored;
    fs::remove_all(temp, ignored);
    return s;
  };
  if (auto s = WriteSyncedFile((fs::path(temp) / kConfigFile).string(), ConfigJson(config));
      !s.ok()) {
    return cleanup(s);
  }
  if (auto s =
          WriteSafetensors((fs::path(temp) / kWeightsFile).string(), views, {{"format", "pt"}});
      !s.ok()) {
    return cleanup(s);
  }
  if (auto s = SyncPath(temp); !s.ok()) return cleanup(s);
  ::chmod(temp.c_str(), 0755);  // mkdtemp makes it 0700
  if (replace) {
    // Swap in one step so readers see the old adapter or the new one, never neither; the old
    // one then sits at `temp` and is removed.
    if (::renameat2(AT_FDCWD, temp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) != 0) {
      return cleanup(
          absl::InternalError(absl::StrCat("cannot replace ", target.string(), ": ", ErrnoText())));
    }
    cleanup(absl::OkStatus()).IgnoreError();  // the old adapter, swapped out
  } else if (::rename(temp.c_str(), target.c_str()) != 0) {
    return cleanup(absl::InternalError(
        absl::StrCat("cannot rename ", temp, " to ", target.string(), ": ", ErrnoText())));
  }
  return SyncPath(parent.string());
}

absl::Status LoraAdapter::ValidateAgainst(const ModelConfig& model) const {
  if (auto s = config.Validate(); !s.ok()) return s;
  for (const auto& [path, pair] : layers) {
    auto module = ParseModulePath(path);
    if (!module.ok()) return module.status();
    if (module->layer >= model.num_hidden_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter layer ", path, " does not exist in the base model: it has ",
                       model.num_hidden_layers, " layers (num_hidden_layers), indices 0-",
                       model.num_hidden_layers - 1));
    }
    const Features f = ProjectionFeatures(model, module->projection);
    for (char factor : {'A', 'B'}) {
      const torch::Tensor& t = factor == 'A' ? pair.a : pair.b;
      const std::vector<int64_t> want = factor == 'A' ? std::vector<int64_t>{config.r, f.in}
                                                      : std::vector<int64_t>{f.out, config.r};
      if (t.defined() && t.sizes().vec() == want) continue;
      return absl::InvalidArgumentError(
          absl::StrCat("adapter tensor ", PeftKey(path, factor), " has shape ",
                       t.defined() ? ShapeString(t) : "(undefined)", " but the base model's ",
                       module->projection, " needs [", absl::StrJoin(want, ", "), "] (r ", config.r,
                       "; ", f.why, "): the adapter was made for a different base model"));
    }
  }
  return absl::OkStatus();
}

int64_t LoraAdapter::bytes() const {
  int64_t n = 0;
  for (const auto& [path, pair] : layers) {
    if (pair.a.defined()) n += static_cast<int64_t>(pair.a.nbytes());
    if (pair.b.defined()) n += static_cast<int64_t>(pair.b.nbytes());
  }
  return n;
}

LoraAdapter LoraAdapter::HostCopy() const {
  LoraAdapter copy = *this;  // the config and flags; the tensors are replaced below
  for (auto& [path, pair] : copy.layers) {
    pair = {pair.a.detach().to(torch::kCPU).clone(), pair.b.detach().to(torch::kCPU).clone()};
  }
  return copy;
}

absl::Status LoraAdapter::CopyWeightsFrom(const LoraAdapter& other) {
  torch::NoGradGuard no_grad;
  for (auto& [path, pair] : layers) {
    auto it = other.layers.find(path);
    if (it == other.layers.end() || !it->second.a.sizes().equals(pair.a.sizes()) ||
        !it->second.b.sizes().equals(pair.b.sizes())) {
      return absl::FailedPreconditionError(
          absl::StrCat("no weights of the same shapes for ", path));
    }
  }
  for (auto& [path, pair] : layers) {
    pair.a.copy_(other.layers.at(path).a);
    pair.b.copy_(other.layers.at(path).b);
  }
  return absl::OkStatus();
}

}  // namespace lorad::engine
