// ToGrpcStatus: the one place engine/server absl::Status codes become gRPC status codes, so
// clients see INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED... exactly as the error was meant.
#pragma once

#include <grpcpp/server_context.h>
#include <grpcpp/support/server_callback.h>
#include <grpcpp/support/status.h>

#include <chrono>

#include "absl/status/status.h"

namespace lorad::server {

grpc::Status ToGrpcStatus(const absl::Status& status);

// The call's deadline on the steady clock (a step of the wall clock while the call runs moves
// it not); max() when it has none, or one more than ten years away: gRPC's own conversion
// (ServerContextBase::deadline) counts nanoseconds since 1970 in 64 bits and wraps a deadline
// past 2262 (a client's timeout of centuries) to one long past, which ended the call at once.
std::chrono::steady_clock::time_point CallDeadline(const grpc::ServerContextBase& context);

// The status of a call gRPC cancelled (OnCancel): DEADLINE_EXCEEDED when its deadline has passed
// or is within 100 ms (gRPC cancels such a call too), else CANCELLED. The client sees its own
// status either way; this is the one lorad_rpc_requests_total counts.
grpc::Status CancelledCallStatus(std::chrono::steady_clock::time_point deadline);

// Ends a unary callback call with `status` (its response as filled so far when OK).
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status);

}  // namespace lorad::server
