// FirstInvalidUtf8Field: loradctl checks a request's text before sending it. proto3 strings must
// be UTF-8, and gRPC's C++ server answers a request that breaks that with a bare UNIMPLEMENTED
// (gRPC issue 30454), which told a user with a Latin-1 terminal that lorad "does not implement the
// call". The check names the field and the byte instead.
#pragma once

#include <google/protobuf/message.h>

#include <optional>
#include <string>

namespace lorad::cli {

// "messages[1].content: not UTF-8 (byte 0xE9 at offset 3)" for the first string field of
// `message` (nested messages included) that is not valid UTF-8; nullopt when every one is.
std::optional<std::string> FirstInvalidUtf8Field(const google::protobuf::Message& message);

// Prints "loradctl: <field>: not UTF-8 (...); convert ..." to stderr and returns true when
// `message` holds text that is not UTF-8 (the request must not be sent); false otherwise.
bool ReportInvalidUtf8(const google::protobuf::Message& message);

}  // namespace lorad::cli
