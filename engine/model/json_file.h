// ReadJsonObjectIfPresent: the model folder's small JSON files (tokenizer_config.json,
// special_tokens_map.json, generation_config.json, config.json), read one way: absent is not an
// error (each has defaults), anything else that is not a JSON object is, naming the file.
#pragma once

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {

// The object in the file at `path`; nullopt when there is no such file. NotFound when it cannot
// be read, InvalidArgument when it is not one JSON object.
absl::StatusOr<std::optional<nlohmann::json>> ReadJsonObjectIfPresent(const std::string& path);

}  // namespace lorad::engine
