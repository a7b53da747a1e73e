// ToGrpcStatus: the one place engine/server absl::Status codes become gRPC status codes, so
// clients see INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED... exactly as the error was meant.
#pragma once

#include <grpcpp/server_context.h>
#include <grpcpp/support/server_callback.h>
#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace lorad::server {

grpc::Status ToGrpcStatus(const absl::Status& status);

// Ends a unary callback call with `status` (its response as filled so far when OK).
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status);

}  // namespace lorad::server
