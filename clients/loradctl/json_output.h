// loradctl's --json output: a reply message as JSON for scripts, with the proto's field names
// and every field, zeros and empty strings too (a script reading a count finds 0, not a
// missing key).
#pragma once

#include <google/protobuf/message.h>

#include <string>

namespace lorad::cli {

// Prints `message` to stdout; kExitOk, or kExitError naming `what` when it cannot be printed.
int PrintJson(const google::protobuf::Message& message, const std::string& what);

}  // namespace lorad::cli
