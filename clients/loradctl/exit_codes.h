// Exit codes of loradctl. Scripts branch on them, so each failure class has its own value and
// a gRPC error always maps to 10 + its status code (UNAVAILABLE = 14 -> 24).
#pragma once

#include <grpcpp/support/status.h>

#include <string>

namespace lorad::cli {

constexpr int kExitOk = 0;
constexpr int kExitError = 1;         // a local failure (file unreadable, bad stream, ...)
constexpr int kExitUsage = 2;         // bad flags or a bad job YAML file
constexpr int kExitJobFailed = 3;     // `train watch`: the job ended in FAILED
constexpr int kExitJobCancelled = 4;  // `train watch`: the job ended in CANCELLED
constexpr int kExitGrpcBase = 10;     // + grpc::StatusCode

inline int ExitCodeForGrpc(grpc::StatusCode code) { return kExitGrpcBase + static_cast<int>(code); }

// "UNAVAILABLE", "NOT_FOUND", ...: the names gRPC users know from every other client.
std::string GrpcCodeName(grpc::StatusCode code);

// The text for --help, listing every code above.
std::string ExitCodesHelp();

}  // namespace lorad::cli
