#include "server/call_authorizer.h"

#include <algorithm>
#include <chrono>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/model/utf8.h"
#include "server/log_limiter.h"
#include "spdlog/spdlog.h"

namespace lorad::server {

absl::Status AuthorizeCall(const TokenAuthenticator& auth, const grpc::ServerContextBase& context,
                           Role needed, const std::string& action, std::string* caller) {
  if (!auth.enabled()) return absl::OkStatus();
  std::string header;
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it != metadata.end()) header.assign(it->second.data(), it->second.size());
  auto principal = auth.Authorize(header, needed);
  if (principal.ok()) {
    if (caller != nullptr) *caller = principal->name;
    // Its outcome follows in the action's own line (or the client's status).
    if (!action.empty()) {
      // A client's names in it, cut and without line breaks: one line a call.
      std::string said = engine::Utf8Shortened(action, 200);
      std::replace_if(
          said.begin(), said.end(), [](char c) { return c >= 0 && c < 0x20; }, '?');
      spdlog::info("{} by '{}' ({})", said, principal->name, context.peer());
    }
    return absl::OkStatus();
  }
  // Who was refused and why (never the token): after tokens are rotated, the clients still
  // sending an old one are found here. Each client address (its port aside) and reason writes a
  // line every 10 s at most, so one retrying in a loop hides no other.
  static LogLimiter limiter(std::chrono::seconds(10));
  const std::string peer = context.peer();
  const std::string reason(principal.status().message());
  const std::string line = absl::StrCat("refused a call from ", peer, ": ", reason);
  if (auto held = limiter.Allow(absl::StrCat(peer.substr(0, peer.rfind(':')), "|", reason), line)) {
    spdlog::warn("{}{}", line, LogLimiter::HeldBack(*held));
  }
  return principal.status();
}

}  // namespace lorad::server
