// JobStore::Open while another process holds the job database's write lock (a sqlite3 shell in a
// transaction, a backup tool): the open waits its busy timeout for the lock, as every write does,
// and past it says who holds the file and what to do.
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "server/job_store.h"

namespace lorad::server {
namespace {

class JobStoreLockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ("job_store_lock_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    path_ = (dir_ / "jobs.db").string();
    ASSERT_TRUE(JobStore::Open(path_).ok());  // made, then closed
    ASSERT_EQ(sqlite3_open(path_.c_str(), &blocker_), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(blocker_, "BEGIN IMMEDIATE;", nullptr, nullptr, nullptr), SQLITE_OK);
  }
  void TearDown() override { sqlite3_close(blocker_); }
  void Release() {
    ASSERT_EQ(sqlite3_exec(blocker_, "ROLLBACK;", nullptr, nullptr, nullptr), SQLITE_OK);
  }
  std::filesystem::path dir_;
  std::string path_;
  sqlite3* blocker_ = nullptr;
};

// It failed at once ("sqlite: database is locked"): the version read it kept open made SQLite
// skip the busy timeout for the writes after it.
TEST_F(JobStoreLockTest, OpenWaitsForALockReleasedWithinItsBusyTimeout) {
  std::thread release([this] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    Release();
  });
  auto store = JobStore::Open(path_, std::chrono::seconds(20));
  release.join();
  EXPECT_TRUE(store.ok()) << store.status();
}

TEST_F(JobStoreLockTest, ALockHeldPastTheBusyTimeoutIsNamed) {
  auto store = JobStore::Open(path_, std::chrono::milliseconds(200));
  ASSERT_FALSE(store.ok());
  EXPECT_TRUE(absl::IsAborted(store.status())) << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(), "is locked by another process"))
      << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(), "sqlite3 shell")) << store.status();
  Release();
}

}  // namespace
}  // namespace lorad::server
