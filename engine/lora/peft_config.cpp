#include "engine/lora/peft_config.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/json_file.h"
#include "engine/runtime/file_fingerprint.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

using nlohmann::ordered_json;

// PEFT's defaults for fields an adapter_config.json leaves out (peft/tuners/lora/config.py).
constexpr int kPeftDefaultRank = 8;
constexpr double kPeftDefaultAlpha = 8;

template <typename T>
bool Contains(const std::vector<T>& v, const T& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

absl::Status ConfigError(const std::string& file, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(file, ": ", what));
}

// target_modules: a list of names, matched as PEFT matches them (a module whose path is a name
// or ends with "." and a name; names matching no projection of a Llama model are ignored, as PEFT
// ignores them), or "all-linear" (the seven projections). Names that say more than a projection
// ("layers.1.self_attn.q_proj") go to `names`, which then picks the modules. PEFT reads any other
// string as a regular expression over whole module paths, which lorad does not.
absl::StatusOr<std::vector<std::string>> ParseTargets(const ordered_json& j,
                                                      const std::string& file,
                                                      std::vector<std::string>* names) {
  auto it = j.find("target_modules");
  const std::string known = absl::StrJoin(KnownLoraTargets(), ", ");
  if (it == j.end() || it->is_null()) {
    return ConfigError(
        file, absl::StrCat("field 'target_modules' is missing; expected a list of ", known));
  }
  if (it->is_string()) {
    const std::string s = it->get<std::string>();
    if (absl::AsciiStrToLower(s) == "all-linear") return KnownLoraTargets();
    if (Contains(KnownLoraTargets(), s)) {
      return ConfigError(file, absl::StrCat("field 'target_modules' is the string '", s,
                                            "', which PEFT reads as a regular expression over "
                                            "whole module paths: it matches no module; write "
                                            "the list [\"",
                                            s, "\"]"));
    }
    return ConfigError(
        file, absl::StrCat("field 'target_modules' is the pattern '", s,
                           "'; lorad does not read regex targets: list the projections (", known,
                           ") instead"));
  }
  if (!it->is_array()) {
    return ConfigError(file, "field 'target_modules' must be a list of module names");
  }
  std::vector<std::string> projections;
  bool paths = false;
  for (const auto& v : *it) {
    if (!v.is_string()) {
      return ConfigError(file, "field 'target_modules' must be a list of module names");
    }
    const std::string name = v.get<std::string>();
    const std::string last = name.substr(name.rfind('.') + 1);
    if (last == "lm_head" || last == "embed_tokens") {  // PEFT adapts them; lorad does not
      return ConfigError(file, absl::StrCat("field 'target_modules' names '", name,
                                            "': lorad adapts the attention and MLP projections (",
                                            known, "), not the embeddings or lm_head"));
    }
    if (!Contains(KnownLoraTargets(), last)) continue;  // matches no module of a Llama model
    paths |= name != last;
    names->push_back(name);
    if (!Contains(projections, last)) projections.push_back(last);
  }
  if (projections.empty()) {
    return ConfigError(file,
                       absl::StrCat("field 'target_modules' (", it->dump(),
                                    ") names no module lorad can adapt (known: ", known, ")"));
  }
  if (!paths) names->clear();  // projections alone: every module of each
  return projections;
}

// Features PEFT has that lorad's LoRA math does not implement: reading such an adapter would
// silently change its outputs, so each is an error.
absl::Status CheckUnsupported(const ordered_json& j, const std::string& file) {
  auto not_supported = [&](const std::string& field, const std::string& value) {
    return ConfigError(
        file, absl::StrCat("field '", field, "' is ", value, ", which lorad does not support"));
  };
  // (fan_in_fan_out is not here: PEFT turns it off itself for the Linear projections of Llama,
  // Mistral and Qwen2.)
  for (const char* field : {"use_dora", "lora_bias"}) {
    auto it = j.find(field);
    if (it != j.end() && !it->is_null() && !(it->is_boolean() && !it->get<bool>())) {
      return not_supported(field, it->dump());
    }
  }
  // bias "all" / "lora_only" trains the base's biases: served as PEFT serves it while the folder
  // holds none (Llama has none); a trained bias in the weights file is refused when read.
  auto bias = j.find("bias");
  if (bias != j.end() && !bias->is_null() &&
      !(bias->is_string() &&
        (bias->get<std::string>() == "none" || bias->get<std::string>() == "all" ||
         bias->get<std::string>() == "lora_only"))) {
    return not_supported("bias", absl::StrCat(bias->dump(), " (none, all or lora_only)"));
  }
  auto save = j.find("modules_to_save");
  if (save != j.end() && !save->is_null() && !(save->is_array() && save->empty())) {
    return not_supported("modules_to_save", save->dump());
  }
  // Variants whose forward is not base + scale * B A on every token (activated LoRA, replicated
  // or reordered layers, trainable token rows, block-diagonal and KaSA updates, Arrow routing,
  // parameter targets, MonteCLoRA): served as plain LoRA they would give other output than PEFT.
  // An empty list is unset; an empty object is not: PEFT makes any dict, {} too, a sub-config
  // with its defaults, which turns the variant on.
  for (const char* field : {"alora_invocation_tokens", "layer_replication",
                            "trainable_token_indices", "target_parameters", "use_bdlora",
                            "kasa_config", "arrow_config", "monteclora_config", "velora_config"}) {
    auto it = j.find(field);
    // (trainable_token_indices may be a dict of layers: {} is none.)
    const bool unset =
        it == j.end() || it->is_null() || (it->is_boolean() && !it->get<bool>()) ||
        (it->is_array() && it->empty()) ||
        (it->is_object() && it->empty() && std::string(field) == "trainable_token_indices");
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

absl::StatusOr<std::vector<PeftModulePattern>> ParsePattern(const ordered_json& j,
                                                            const char* field,
                                                            const std::string& file) {
  std::vector<PeftModulePattern> out;
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return out;
  if (!it->is_object())
    return ConfigError(file, absl::StrCat("field '", field, "' must be an object"));
  for (const auto& [key, value] : it->items()) {
    if (!value.is_number()) {
      return ConfigError(file, absl::StrCat("field '", field, "': '", key, "' must be a number"));
    }
    auto matcher = std::make_shared<const RE2>(absl::StrCat("(.*\\.)?(", key, ")"), RE2::Quiet);
    if (!matcher->ok()) {
      return ConfigError(file, absl::StrCat("field '", field, "': '", key,
                                            "' is not a regular expression lorad can read"));
    }
    out.push_back({key, std::move(matcher), value.get<double>()});
  }
  return out;
}

}  // namespace

// The value of the first pattern that matches `module` (PEFT: re.match(rf"(.*\.)?({key})$")).
std::optional<double> PatternValue(const std::vector<PeftModulePattern>& patterns,
                                   const std::string& module) {
  for (const PeftModulePattern& p : patterns) {
    if (RE2::FullMatch(module, *p.matcher)) return p.value;
  }
  return std::nullopt;
}

absl::StatusOr<LoraConfig> ParsePeftConfig(const std::string& text, const std::string& file,
                                           PeftModulePatterns* patterns) {
  if (auto s = CheckJsonNesting(text, file); !s.ok()) return s;
  ordered_json j;
  try {
    j = ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    // e.what() names the byte offset and what the parser expected there (parse_error), or the
    // number past a double's range (out_of_range).
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
    if (!(c.alpha > 0 && c.alpha <= kMaxLoraAlpha)) {  // named as the file names it
      return ConfigError(file, absl::StrCat("field 'lora_alpha' must be in (0, ", kMaxLoraAlpha,
                                            "], got ", c.alpha));
    }
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
  auto targets = ParseTargets(j, file, &c.target_names);
  if (!targets.ok()) return targets.status();
  c.target_modules = *targets;
  auto rank = ParsePattern(j, "rank_pattern", file);
  if (!rank.ok()) return rank.status();
  auto alpha = ParsePattern(j, "alpha_pattern", file);
  if (!alpha.ok()) return alpha.status();
  for (const PeftModulePattern& p : *rank) {
    if (p.value != std::floor(p.value) || p.value < 1 || p.value > 1024) {
      return ConfigError(file, absl::StrCat("field 'rank_pattern': '", p.key, "' is ", p.value,
                                            "; ranks are whole numbers in [1, 1024]"));
    }
  }
  for (const PeftModulePattern& p : *alpha) {
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
    c.layers_to_transform = patterns->layers;
  }
  // layers_pattern: where PEFT finds the layer index layers_to_transform picks by; Llama-family
  // paths have it after "layers" (model.layers.3...). PEFT adapts nothing with another one.
  // An empty one ("" or []) is "any", as PEFT reads it.
  if (auto it = j.find("layers_pattern");
      it != j.end() && !it->is_null() && !(it->is_string() && it->get<std::string>().empty())) {
    const ordered_json list = it->is_array() ? *it : ordered_json::array({*it});
    bool names_layers = false;
    for (const auto& v : list) {
      if (!v.is_string()) {
        return ConfigError(file, "field 'layers_pattern' must be a name or a list of names");
      }
      // PEFT: re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key).
      const RE2 finds_index(absl::StrCat("(?:|.*?\\.)", v.get<std::string>(), "\\.\\d+\\..*"),
                            RE2::Quiet);
      names_layers |=
          finds_index.ok() && RE2::FullMatch("model.layers.0.self_attn.q_proj", finds_index);
    }
    const auto given = j.find("layers_to_transform");
    if (!list.empty() && (given == j.end() || given->is_null())) {
      return ConfigError(file,
                         "field 'layers_pattern' is given without layers_to_transform (PEFT "
                         "refuses such a config)");
    }
    if (!list.empty() && !c.layers_to_transform.empty() && !names_layers) {
      return ConfigError(file, absl::StrCat("field 'layers_pattern' is ", it->dump(),
                                            ": this model's layers are 'layers' "
                                            "(model.layers.<i>), so PEFT would adapt no module"));
    }
  }
  // PEFT refuses layers_to_transform and layers_pattern beside a string target ("all-linear").
  if (auto targets_it = j.find("target_modules");
      targets_it != j.end() && targets_it->is_string()) {
    for (const char* field : {"layers_to_transform", "layers_pattern"}) {
      auto it = j.find(field);
      if (it != j.end() && !it->is_null()) {
        return ConfigError(file, absl::StrCat("field '", field,
                                              "' cannot be used when 'target_modules' is a "
                                              "string (PEFT refuses such a config); list the "
                                              "projections instead"));
      }
    }
  }
  // exclude_modules: PEFT leaves these modules unadapted (a list of names, or one regex).
  if (auto it = j.find("exclude_modules"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      c.exclude_modules_regex = it->get<std::string>();
    } else if (it->is_array()) {
      for (const auto& v : *it) {
        if (!v.is_string()) {
          return ConfigError(file, "field 'exclude_modules' must be a list of module names");
        }
        // An empty name matches no module (PEFT's rule); kept out so it cannot match all.
        if (!v.get<std::string>().empty()) c.exclude_modules.push_back(v.get<std::string>());
      }
    } else {
      return ConfigError(file,
                         "field 'exclude_modules' must be a list of module names or a regular "
                         "expression");
    }
  }
  if (auto s = c.Validate(); !s.ok()) return ConfigError(file, std::string(s.message()));
  return c;
}

// The adapter_config.json PEFT 0.21 writes for a LoRA adapter, field for field (sorted keys,
// indent 2, as PEFT's save_pretrained), so PEFT loads it with the same settings it would have
// saved. peft_version is left out: PEFT fills in its own version when it loads the file.
std::string PeftConfigJson(const LoraConfig& c) {
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
  if (!c.exclude_modules_regex.empty()) {
    j["exclude_modules"] = c.exclude_modules_regex;
  } else if (!c.exclude_modules.empty()) {
    j["exclude_modules"] = c.exclude_modules;
  } else {
    j["exclude_modules"] = null;
  }
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["kasa_config"] = null;
  j["layer_replication"] = null;
  j["layers_pattern"] = null;
  if (c.layers_to_transform.empty()) {
    j["layers_to_transform"] = null;
  } else {
    j["layers_to_transform"] = c.layers_to_transform;
  }
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
  if (c.target_names.empty()) {
    j["target_modules"] = c.target_modules;
  } else {
    j["target_modules"] = c.target_names;
  }
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

absl::StatusOr<std::string> PeftFolderFingerprint(const std::string& folder) {
  return FilesFingerprint({absl::StrCat(folder, "/adapter_config.json"),
                           absl::StrCat(folder, "/adapter_model.safetensors")});
}

absl::Status CheckPeftFolderFingerprint(const std::string& folder, const std::string& fingerprint,
                                        const std::string& since) {
  auto now = PeftFolderFingerprint(folder);
  if (now.ok() && *now == fingerprint) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("its folder ", folder,
                   now.ok() ? absl::StrCat(" holds other files than ", since)
                            : absl::StrCat(" cannot be read (", now.status().message(), ")")));
}

}  // namespace lorad::engine
