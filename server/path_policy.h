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

}  // namespace lorad::server
