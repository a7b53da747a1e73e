// Short, lower-case names for proto enum values, as users type them: JOB_STATE_QUEUED is
// "queued", OPTIMIZER_ADAMW_8BIT is "adamw_8bit". The prefix is the enum type's name in
// UPPER_SNAKE case, so new values need no table here.
#pragma once

#include <google/protobuf/descriptor.h>

#include <string>
#include <vector>

namespace lorad::cli {

std::string EnumShortName(const google::protobuf::EnumValueDescriptor* value);

// Every short name of `type`, in declaration order (for error messages and --help).
std::vector<std::string> EnumShortNames(const google::protobuf::EnumDescriptor* type);

// Accepts the short name or the full proto name, in any case; nullptr when neither matches.
const google::protobuf::EnumValueDescriptor* ParseEnumShortName(
    const google::protobuf::EnumDescriptor* type, const std::string& text);

}  // namespace lorad::cli
