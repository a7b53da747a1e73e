// LoraConfig: a LoRA adapter's hyper-parameters (PEFT's adapter_config.json fields). torch-free so
// the server can validate job specs with it.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace lorad::engine {

struct LoraConfig {
  int r = 16;
  double alpha = 16;
  double dropout = 0;
  // Short projection names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
  std::vector<std::string> target_modules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  bool use_rslora = false;
  std::string base_model_name_or_path;
  // PEFT's layers_to_transform: the only decoder layers adapted, as read from an adapter folder
  // (and written back, so PEFT adapts the same layers after a lorad job continued it); empty =
  // every layer.
  std::vector<int64_t> layers_to_transform;
  // PEFT's exclude_modules: modules left unadapted although target_modules names them, as read
  // from an adapter folder (and written back). Names, each matching a module path whole or its
  // end after a '.', or (exclude_modules_regex) one regular expression the whole path must match,
  // as PEFT's check_target_module_exists. Empty = none.
  std::vector<std::string> exclude_modules;
  std::string exclude_modules_regex;

  // PEFT's target_modules as an adapter folder names them, when some name more than a projection
  // ("layers.1.self_attn.q_proj"): PEFT adapts a module whose path is a name or ends with "." and
  // a name. Written back as read. Empty = every module of a projection in target_modules.
  std::vector<std::string> target_names;

  // Whether exclude_modules leaves `module_path` ("model.layers.3.self_attn.q_proj") unadapted.
  bool Excludes(const std::string& module_path) const;
  // Whether target_names (when given) names `module_path`.
  bool TargetNamesInclude(const std::string& module_path) const;
  // Whether target_modules names this module by its whole path: PEFT then adapts it whatever
  // layers_to_transform says (that filter applies to names matched at a path's end).
  bool NamesWholePath(const std::string& module_path) const;
  // Whether the module at `module_path` is adapted: its projection is a target, target_names
  // name it, and exclude_modules does not leave it out (layers_to_transform is the caller's).
  bool Adapts(const std::string& module_path) const;

  double scaling() const { return use_rslora ? alpha / std::sqrt(double(r)) : alpha / r; }
  // r in [1, 1024], alpha > 0, dropout in [0, 1), targets known and not empty, an
  // exclude_modules_regex that compiles.
  absl::Status Validate() const;
};

// The largest rank lorad trains or serves. Beyond it the adapter is as large as the layers it
// adapts and LoRA stops making sense; the limit also bounds the memory a job spec can ask for.
constexpr int kMaxLoraRank = 1024;
// alpha / r scales every update: beyond this it overflows bf16 activations (NaN output).
constexpr double kMaxLoraAlpha = 1e6;

// The seven projections LoRA may target, in PEFT's names.
const std::vector<std::string>& KnownLoraTargets();

}  // namespace lorad::engine
