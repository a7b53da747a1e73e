#include "server/path_policy.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace lorad::server {
namespace {

namespace fs = std::filesystem;

class PathPolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    base_ = fs::path(::testing::TempDir()) / ("path_policy_" + std::to_string(getpid()));
    fs::remove_all(base_);
    root_ = base_ / "datasets";
    fs::create_directories(root_ / "team");
    fs::create_directories(base_ / "secret");
    std::ofstream(root_ / "team" / "qa.jsonl") << "{}";
    std::ofstream(base_ / "secret" / "key") << "x";
    fs::create_symlink(base_ / "secret", root_ / "escape");
    fs::create_symlink(root_ / "team", root_ / "alias");
  }
  fs::path base_, root_;
};

TEST_F(PathPolicyTest, RelativeAndAbsolutePathsInsideTheRootResolve) {
  auto rel = ResolveInsideRoot(root_.string(), "team/qa.jsonl", "dataset.path");
  ASSERT_TRUE(rel.ok()) << rel.status();
  EXPECT_EQ(*rel, fs::canonical(root_ / "team" / "qa.jsonl").string());
  EXPECT_TRUE(ResolveInsideRoot(root_.string(), (root_ / "team/qa.jsonl").string(), "f").ok());
  EXPECT_TRUE(ResolveInsideRoot(root_.string(), "alias/qa.jsonl", "f").ok());   // link inside
  EXPECT_TRUE(ResolveInsideRoot(root_.string(), "team/new-output", "f").ok());  // not yet there
}

TEST_F(PathPolicyTest, DotDotAndSymlinkEscapesArePermissionDenied) {
  for (const std::string bad : {"../secret/key", "team/../../secret/key", "escape/key",
                                "/etc/passwd", "escape/../../secret/key"}) {
    auto r = ResolveInsideRoot(root_.string(), bad, "dataset.path");
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_TRUE(absl::IsPermissionDenied(r.status())) << bad << ": " << r.status();
    EXPECT_NE(r.status().message().find("dataset.path"), std::string::npos);
    // Where a path outside leads is not told (a caller could map the host with it).
    EXPECT_EQ(r.status().message().find((base_ / "secret").string()), std::string::npos)
        << r.status();
  }
}

TEST_F(PathPolicyTest, PrefixLookalikeIsNotInside) {
  fs::create_directories(base_ / "datasets-other");
  auto r = ResolveInsideRoot(root_.string(), (base_ / "datasets-other").string(), "f");
  EXPECT_TRUE(absl::IsPermissionDenied(r.status()));
}

// An adapter folder inside the root whose weights file links out of it is refused too.
TEST_F(PathPolicyTest, AdapterFolderFilesMustStayInsideTheRoot) {
  fs::create_directories(root_ / "ok");
  std::ofstream(root_ / "ok" / "adapter_config.json") << "{}";
  EXPECT_TRUE(ResolveAdapterFolder(root_.string(), "ok", "path").ok());
  fs::create_symlink(base_ / "secret" / "key", root_ / "ok" / "adapter_model.safetensors");
  auto r = ResolveAdapterFolder(root_.string(), "ok", "path");
  EXPECT_TRUE(absl::IsPermissionDenied(r.status())) << r.status();
  EXPECT_TRUE(
      absl::IsPermissionDenied(ResolveAdapterFolder(root_.string(), "escape", "p").status()));
}

TEST_F(PathPolicyTest, EmptyPathIsInvalid) {
  EXPECT_TRUE(absl::IsInvalidArgument(ResolveInsideRoot(root_.string(), "", "f").status()));
}

}  // namespace
}  // namespace lorad::server
