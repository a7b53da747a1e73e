// AuthorizeCall: checks a gRPC call's `authorization: Bearer <token>` metadata against the
// configured tokens (TokenAuthenticator) for the role the method needs. Every lorad service
// method calls it first; health and reflection stay open, as load balancers expect.
#pragma once

#include <grpcpp/server_context.h>

#include "absl/status/status.h"
#include "server/token_authenticator.h"

namespace lorad::server {

// OK when no tokens are configured. UNAUTHENTICATED / PERMISSION_DENIED otherwise, as
// TokenAuthenticator::Authorize says.
absl::Status AuthorizeCall(const TokenAuthenticator& auth, const grpc::ServerContextBase& context,
                           Role needed);

}  // namespace lorad::server
