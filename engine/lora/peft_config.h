// PEFT's adapter_config.json for a LoRA adapter: read (with every field PEFT honours that would
// make lorad compute something else refused by name) and written as PEFT 0.21 writes it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/lora/lora_config.h"
#include "re2/re2.h"

namespace lorad::engine {

// rank_pattern / alpha_pattern: per-module ranks and alphas, keyed by Python regular expressions
// that PEFT matches against the end of a module's name (peft.utils.other.get_pattern_key), the
// first key in the file's order that matches winning.
struct PeftModulePattern {
  std::string key;
  std::shared_ptr<const RE2> matcher;  // (.*\.)?(key), matched against the whole module name
  double value = 0;
};
struct PeftModulePatterns {
  std::vector<PeftModulePattern> rank, alpha;
  std::vector<int64_t> layers;  // layers_to_transform: the only layers adapted; empty = all
};

// The LoRA settings in `text`, the content of the adapter_config.json at `file` (errors name it
// and the field); the per-module rank_pattern / alpha_pattern / layers_to_transform go to
// `patterns`.
absl::StatusOr<LoraConfig> ParsePeftConfig(const std::string& text, const std::string& file,
                                           PeftModulePatterns* patterns);

// The value of the first pattern that matches `module` (PEFT: re.match(rf"(.*\.)?({key})$")).
std::optional<double> PatternValue(const std::vector<PeftModulePattern>& patterns,
                                   const std::string& module);

// What a PEFT adapter folder's two files (adapter_config.json, adapter_model.safetensors) hold
// (FilesFingerprint): recorded when an adapter is loaded or a job is submitted to continue it,
// compared when it is read again.
absl::StatusOr<std::string> PeftFolderFingerprint(const std::string& folder);

// OK when the PEFT folder holds the files `fingerprint` was taken of; else FAILED_PRECONDITION
// "its folder <folder> holds other files than <since>" or "... cannot be read (<why>)", which
// callers wrap with what the folder is and what to do.
absl::Status CheckPeftFolderFingerprint(const std::string& folder, const std::string& fingerprint,
                                        const std::string& since);

// The adapter_config.json PEFT 0.21 writes for a LoRA adapter, field for field (sorted keys,
// indent 2, as PEFT's save_pretrained), so PEFT loads it with the same settings it would have
// saved.
std::string PeftConfigJson(const LoraConfig& c);

}  // namespace lorad::engine
