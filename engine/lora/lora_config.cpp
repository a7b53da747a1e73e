#include "engine/lora/lora_config.h"

#include <re2/re2.h>

#include <algorithm>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lorad::engine {

const std::vector<std::string>& KnownLoraTargets() {
  static const std::vector<std::string> kTargets = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"};
  return kTargets;
}

absl::Status LoraConfig::Validate() const {
  if (r < 1 || r > kMaxLoraRank) {
    return absl::InvalidArgumentError(
        absl::StrCat("LoRA field 'r' must be in [1, ", kMaxLoraRank, "], got ", r));
  }
  if (!(alpha > 0 && alpha <= kMaxLoraAlpha)) {  // NaN fails too
    return absl::InvalidArgumentError(
        absl::StrCat("LoRA field 'alpha' must be in (0, ", kMaxLoraAlpha, "], got ", alpha));
  }
  // Written so that NaN fails too. 1 is torch's (and PEFT's) limit: an adapter trained with it
  // serves as any other (dropout is off in inference); a training job is refused it by the job
  // spec's narrower range.
  if (!(dropout >= 0 && dropout <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("LoRA field 'dropout' must be in [0, 1], got ", dropout));
  }
  if (target_modules.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("LoRA field 'target_modules' is empty; choose from ",
                     absl::StrJoin(KnownLoraTargets(), ", ")));
  }
  const auto& known = KnownLoraTargets();
  std::set<std::string> seen;
  for (const auto& t : target_modules) {
    if (std::find(known.begin(), known.end(), t) == known.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("LoRA field 'target_modules' has unknown module '", t,
                       "'; known: ", absl::StrJoin(known, ", ")));
    }
    if (!seen.insert(t).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("LoRA field 'target_modules' lists '", t, "' twice"));
    }
  }
  if (!exclude_modules_regex.empty()) {
    const RE2 pattern(exclude_modules_regex, RE2::Quiet);
    if (!pattern.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("LoRA field 'exclude_modules': '", exclude_modules_regex,
                       "' is not a regular expression lorad reads (", pattern.error(), ")"));
    }
  }
  return absl::OkStatus();
}

namespace {

// PEFT's rule for a list of names: the whole path, or its end after a '.'.
bool NameMatches(const std::string& module_path, const std::string& name) {
  return module_path == name || absl::EndsWith(module_path, "." + name);
}

}  // namespace

bool LoraConfig::TargetNamesInclude(const std::string& module_path) const {
  if (target_names.empty()) return true;
  return std::any_of(target_names.begin(), target_names.end(),
                     [&](const std::string& name) { return NameMatches(module_path, name); });
}

bool LoraConfig::NamesWholePath(const std::string& module_path) const {
  return std::find(target_names.begin(), target_names.end(), module_path) != target_names.end();
}

bool LoraConfig::Adapts(const std::string& module_path) const {
  const std::string projection = module_path.substr(module_path.rfind('.') + 1);
  return std::find(target_modules.begin(), target_modules.end(), projection) !=
             target_modules.end() &&
         TargetNamesInclude(module_path) && !Excludes(module_path);
}

bool LoraConfig::Excludes(const std::string& module_path) const {
  if (!exclude_modules_regex.empty()) {
    return RE2::FullMatch(module_path, RE2(exclude_modules_regex, RE2::Quiet));
  }
  return std::any_of(exclude_modules.begin(), exclude_modules.end(),
                     [&](const std::string& name) { return NameMatches(module_path, name); });
}

}  // namespace lorad::engine
