#include "server/call_authorizer.h"

#include <string>

namespace lorad::server {

absl::Status AuthorizeCall(const TokenAuthenticator& auth, const grpc::ServerContextBase& context,
                           Role needed) {
  if (!auth.enabled()) return absl::OkStatus();
  std::string header;
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it != metadata.end()) header.assign(it->second.data(), it->second.size());
  auto principal = auth.Authorize(header, needed);
  return principal.ok() ? absl::OkStatus() : principal.status();
}

}  // namespace lorad::server
