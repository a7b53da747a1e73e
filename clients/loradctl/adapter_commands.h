// `loradctl adapters ...`: list, load (hot swap) and unload LoRA adapters.
// Each function runs one command and returns the process exit code (exit_codes.h).
#pragma once

#include <cstdint>
#include <string>

#include "clients/loradctl/connection.h"

namespace lorad::cli {

// The loaded adapters as a table, or (json) as the lorad.v1.ListAdaptersResponse in JSON.
int RunAdaptersList(Connection& connection, bool json);

// `path` is a PEFT folder under the daemon's adapter root (resolved by the daemon, not here).
int RunAdaptersLoad(Connection& connection, const std::string& name, const std::string& path);

// `version` 0 unloads every version of `name`.
int RunAdaptersUnload(Connection& connection, const std::string& name, int64_t version);

}  // namespace lorad::cli
