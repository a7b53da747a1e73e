// ResolveInsideRoot: every path a request names (dataset, adapter, output) must resolve, after
// symlinks, inside the root the operator configured for it. `../` tricks and symlinks pointing out
// of the root are PERMISSION_DENIED.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace lorad::server {

// `requested` may be relative (to `root`) or absolute. The path need not exist yet (outputs);
// its existing part is resolved through symlinks. `field` names the request field in errors
// ("dataset.path"). Returns the resolved absolute path.
absl::StatusOr<std::string> ResolveInsideRoot(const std::string& root, const std::string& requested,
                                              const std::string& field);

// A PEFT adapter folder inside `root`, with the files read from it (adapter_config.json,
// adapter_model.safetensors) inside `root` too: a symlink in the folder could point anywhere.
// Checked when an adapter is loaded and again when a restart serves it again.
absl::StatusOr<std::string> ResolveAdapterFolder(const std::string& root, const std::string& path,
                                                 const std::string& field);

}  // namespace lorad::server
