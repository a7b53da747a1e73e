#include "server/call_authorizer.h"

#include <chrono>
#include <string>

#include "server/log_limiter.h"
#include "spdlog/spdlog.h"

namespace lorad::server {

absl::Status AuthorizeCall(const TokenAuthenticator& auth, const grpc::ServerContextBase& context,
                           Role needed) {
  if (!auth.enabled()) return absl::OkStatus();
  std::string header;
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it != metadata.end()) header.assign(it->second.data(), it->second.size());
  auto principal = auth.Authorize(header, needed);
  if (principal.ok()) return absl::OkStatus();
  // Who was refused and why (never the token): after tokens are rotated, the client still
  // sending an old one is found here. A client retrying in a loop writes a line every 10 s.
  static LogLimiter limiter(std::chrono::seconds(10));
  if (auto held = limiter.Allow()) {
    spdlog::warn("refused a call from {}: {}{}", context.peer(),
                 std::string(principal.status().message()), LogLimiter::HeldBack(*held));
  }
  return principal.status();
}

}  // namespace lorad::server
