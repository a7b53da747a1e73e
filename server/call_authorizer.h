// AuthorizeCall: checks a gRPC call's `authorization: Bearer <token>` metadata against the
// configured tokens (TokenAuthenticator) for the role the method needs. Every lorad service
// method calls it first; health and reflection stay open, as load balancers expect.
#pragma once

#include <grpcpp/server_context.h>

#include <string>

#include "absl/status/status.h"
#include "server/token_authenticator.h"

namespace lorad::server {

// OK when no tokens are configured. UNAUTHENTICATED / PERMISSION_DENIED otherwise, as
// TokenAuthenticator::Authorize says. `action` (an admin method's name): an authorized call is
// logged with the name of the token that made it, so that a team sharing lorad can tell who
// submitted, cancelled, deleted, loaded or unloaded what. `caller`, when given, is set to the
// name of the token that made an authorized call ("" without tokens).
absl::Status AuthorizeCall(const TokenAuthenticator& auth, const grpc::ServerContextBase& context,
                           Role needed, const std::string& action = "",
                           std::string* caller = nullptr);

}  // namespace lorad::server
