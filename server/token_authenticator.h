// TokenAuthenticator: bearer tokens from the config, each with a role. `admin` may submit and
// cancel jobs and load or unload adapters; `user` may run inference and read. The gRPC layer
// passes the `authorization` metadata value ("Bearer <token>") and the role a method needs.
//
// Thread rules: configured once at start-up, then read-only (any thread).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lorad::server {

enum class Role { kUser = 1, kAdmin = 2 };  // admin includes every user permission

absl::StatusOr<Role> RoleFromName(const std::string& name);  // "user" | "admin"

struct Principal {
  std::string name;  // who, for logs and metrics (never the token)
  Role role = Role::kUser;
};

class TokenAuthenticator {
 public:
  // Tokens must be at least 16 characters, unique, and free of white space.
  absl::Status Add(const std::string& token, Role role, const std::string& name);
  bool enabled() const { return !entries_.empty(); }

  // UNAUTHENTICATED when the header is missing, malformed or holds an unknown token;
  // PERMISSION_DENIED when the token's role is below `needed`. With no tokens configured,
  // every caller is an admin (the server then binds to loopback only; see the config).
  absl::StatusOr<Principal> Authorize(const std::string& authorization_header, Role needed) const;

 private:
  struct Entry {
    std::string token;
    Principal principal;
  };
  std::vector<Entry> entries_;
};

}  // namespace lorad::server
