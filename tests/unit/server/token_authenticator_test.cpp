#include "server/token_authenticator.h"

#include <gtest/gtest.h>

namespace lorad::server {
namespace {

constexpr const char* kAdminToken = "admin-0123456789abcdef";
constexpr const char* kUserToken = "user-0123456789abcdef";

TokenAuthenticator Configured() {
  TokenAuthenticator auth;
  EXPECT_TRUE(auth.Add(kAdminToken, Role::kAdmin, "ops").ok());
  EXPECT_TRUE(auth.Add(kUserToken, Role::kUser, "app").ok());
  return auth;
}

TEST(TokenAuthenticator, RolesGrantTheirCalls) {
  auto auth = Configured();
  auto admin = auth.Authorize(std::string("Bearer ") + kAdminToken, Role::kAdmin);
  ASSERT_TRUE(admin.ok());
  EXPECT_EQ(admin->name, "ops");
  EXPECT_TRUE(auth.Authorize(std::string("Bearer ") + kAdminToken, Role::kUser).ok());
  EXPECT_TRUE(auth.Authorize(std::string("Bearer ") + kUserToken, Role::kUser).ok());
  EXPECT_TRUE(auth.Authorize(std::string("bearer ") + kUserToken, Role::kUser).ok());
  EXPECT_TRUE(auth.Authorize(std::string("BEARER ") + kUserToken, Role::kUser).ok());
}

TEST(TokenAuthenticator, UserTokenOnAdminCallIsPermissionDenied) {
  auto auth = Configured();
  auto r = auth.Authorize(std::string("Bearer ") + kUserToken, Role::kAdmin);
  EXPECT_TRUE(absl::IsPermissionDenied(r.status()));
  EXPECT_NE(r.status().message().find("app"), std::string::npos);
}

TEST(TokenAuthenticator, MissingMalformedAndWrongTokensAreUnauthenticated) {
  auto auth = Configured();
  for (const std::string header :
       {"", "Bearer ", "Basic abc", kUserToken, "Bearer user-0123456789abcdeX", "Bearer admin"}) {
    EXPECT_TRUE(absl::IsUnauthenticated(auth.Authorize(header, Role::kUser).status())) << header;
  }
}

TEST(TokenAuthenticator, WeakOrDuplicateTokensAreRejectedAtConfigTime) {
  TokenAuthenticator auth;
  EXPECT_FALSE(auth.Add("short", Role::kUser, "a").ok());
  EXPECT_FALSE(auth.Add("has a space in it!!", Role::kUser, "a").ok());
  // Outside printable ASCII, a gRPC header cannot carry it: no client could send the token.
  for (const char* unsendable : {"p\xC3\xA4sswort-0123456789", "0123456789abcdef\r"}) {
    const absl::Status refused = auth.Add(unsendable, Role::kUser, "a");
    EXPECT_TRUE(absl::IsInvalidArgument(refused)) << refused;
    EXPECT_NE(refused.message().find("printable ASCII"), std::string::npos) << refused;
  }
  ASSERT_TRUE(auth.Add(kUserToken, Role::kUser, "a").ok());
  EXPECT_FALSE(auth.Add(kUserToken, Role::kAdmin, "b").ok());
}

TEST(TokenAuthenticator, NoTokensMeansOpenAccess) {
  TokenAuthenticator auth;
  EXPECT_FALSE(auth.enabled());
  EXPECT_TRUE(auth.Authorize("", Role::kAdmin).ok());
}

TEST(Role, NamesParse) {
  EXPECT_EQ(*RoleFromName("admin"), Role::kAdmin);
  EXPECT_FALSE(RoleFromName("root").ok());
}

}  // namespace
}  // namespace lorad::server
