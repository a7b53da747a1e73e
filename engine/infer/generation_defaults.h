// GenerationDefaults: what a request that leaves a sampling field unset gets, read from the model
// folder's generation_config.json, so that a request setting nothing generates as transformers'
// model.generate(**inputs) does with that model (and as vLLM serves it, --generation-config auto).
//
// transformers' rules (GenerationConfig, 5.x):
//   - do_sample false or absent: greedy; temperature/top_k/top_p/min_p in the file are ignored
//     (transformers warns about them);
//   - do_sample true: temperature (else 1.0), top_k (else 50, transformers' global default),
//     top_p (else 1.0), min_p (else off);
//   - repetition_penalty applies in both cases;
//   - max_new_tokens when the file gives one (transformers' max_length=20 fallback is not taken:
//     the server has its own default).
// torch-free: the server includes it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "engine/infer/sampler.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {

struct GenerationDefaults {
  SamplingParams sampling;                // max_new_tokens and seed unused
  std::optional<int32_t> max_new_tokens;  // the file's, when it has one
  bool from_file = false;                 // generation_config.json was there

  // The defaults in `file`, generation_config.json's object as ReadJsonObjectIfPresent read it
  // from `source` (nullopt, no file: the built-in defaults, greedy). A field of the wrong type or
  // out of range is InvalidArgument naming `source` and the field. (The file is read apart so
  // that a caller tells a file it cannot read from a field it could ignore.)
  static absl::StatusOr<GenerationDefaults> FromFile(const std::optional<nlohmann::json>& file,
                                                     const std::string& source);

  // "temperature 0.6, top_p 0.9, top_k 50" (the fields that differ from lorad's built-in
  // defaults), or "greedy" when none does; for the start-up log.
  std::string Describe() const;
};

}  // namespace lorad::engine
