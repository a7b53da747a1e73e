#include "server/token_authenticator.h"

#include <cctype>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace lorad::server {
namespace {

// Compares without an early exit, so response times do not reveal how much of a token matched.
// (Lengths are not secret.)
bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

}  // namespace

absl::StatusOr<Role> RoleFromName(const std::string& name) {
  if (name == "user") return Role::kUser;
  if (name == "admin") return Role::kAdmin;
  return absl::InvalidArgumentError(
      absl::StrCat("role '", name, "' is unknown (known: user, admin)"));
}

absl::Status TokenAuthenticator::Add(const std::string& token, Role role, const std::string& name) {
  if (token.size() < 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("token for '", name, "' is shorter than 16 characters; use a random one"));
  }
  for (char c : token) {
    // A gRPC header value carries printable ASCII only: a client could never send another.
    if (c < '!' || c > '~') {
      return absl::InvalidArgumentError(absl::StrCat(
          "token for '", name,
          "' contains white space or a character outside printable ASCII, which a gRPC header "
          "cannot carry; use letters, digits and punctuation"));
    }
  }
  for (const auto& e : entries_) {
    if (e.token == token) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token for '", name, "' is the same as the token for '", e.principal.name, "'"));
    }
  }
  entries_.push_back({token, {name, role}});
  return absl::OkStatus();
}

absl::StatusOr<Principal> TokenAuthenticator::Authorize(const std::string& header,
                                                        Role needed) const {
  if (!enabled()) return Principal{"anonymous", Role::kAdmin};
  constexpr const char kPrefix[] = "Bearer ";
  // The scheme name is case-insensitive (RFC 7235): "bearer x" is the same header.
  if (header.size() <= sizeof(kPrefix) - 1 ||
      !absl::EqualsIgnoreCase(header.substr(0, sizeof(kPrefix) - 1), kPrefix)) {
    return absl::UnauthenticatedError(
        "missing bearer token: send the metadata 'authorization: Bearer <token>'");
  }
  const std::string token = header.substr(sizeof(kPrefix) - 1);
  const Entry* match = nullptr;
  for (const auto& e : entries_) {
    if (ConstantTimeEquals(token, e.token)) match = &e;
  }
  if (match == nullptr) return absl::UnauthenticatedError("the bearer token is not valid");
  if (static_cast<int>(match->principal.role) < static_cast<int>(needed)) {
    return absl::PermissionDeniedError(absl::StrCat(
        "'", match->principal.name, "' has the user role; this call needs an admin token"));
  }
  return match->principal;
}

}  // namespace lorad::server
