// FilesFingerprint (engine/runtime/file_fingerprint.h) and ReadRegularFile
// (engine/runtime/durable_file.h): a changed file is told from an unchanged one, and what is not a
// regular file is refused at once: a named pipe in an adapter's or dataset's place held a job's
// start, SubmitJob (and with it every admin call) and the daemon's start.
#include "engine/runtime/file_fingerprint.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "engine/runtime/durable_file.h"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;

TEST(FilesFingerprintTest, ChangesWithTheBytesAndRefusesWhatIsNotARegularFile) {
  const fs::path folder = fs::path(::testing::TempDir()) / "lorad-fingerprint-test";
  fs::remove_all(folder);
  fs::create_directories(folder);
  const std::string a = (folder / "a.json").string();
  const std::string b = (folder / "b.bin").string();
  std::ofstream(a) << "{\"r\": 8}";
  std::ofstream(b) << std::string(3 << 20, 'x');  // more than one 1 MiB read

  auto first = FilesFingerprint({a, b});
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*FilesFingerprint({a, b}), *first);
  EXPECT_EQ(first->substr(0, 2), "8:");  // the size, then the hash
  std::ofstream(a) << "{\"r\": 9}";      // same size, other bytes
  EXPECT_NE(*FilesFingerprint({a, b}), *first);

  auto missing = FilesFingerprint({a, (folder / "gone").string()});
  EXPECT_TRUE(absl::IsNotFound(missing.status())) << missing.status();

  // A named pipe with no writer: refused at once, not waited on.
  const std::string pipe = (folder / "adapter_model.safetensors").string();
  ASSERT_EQ(::mkfifo(pipe.c_str(), 0600), 0);
  auto fifo = FilesFingerprint({a, pipe});
  ASSERT_TRUE(absl::IsInvalidArgument(fifo.status())) << fifo.status();
  EXPECT_NE(fifo.status().message().find("'" + pipe + "' is a named pipe (FIFO)"),
            std::string::npos)
      << fifo.status();
  auto dir = FilesFingerprint({folder.string()});
  EXPECT_TRUE(absl::IsInvalidArgument(dir.status())) << dir.status();
  EXPECT_NE(dir.status().message().find("is a directory"), std::string::npos) << dir.status();
}

TEST(ReadRegularFileTest, ReadsAFileAndRefusesAPipeOrAFolderAtOnce) {
  const fs::path folder = fs::path(::testing::TempDir()) / "lorad-read-regular-test";
  fs::remove_all(folder);
  fs::create_directories(folder);
  const std::string file = (folder / "adapter_config.json").string();
  const std::string text = "{\"r\": 8}" + std::string(100000, ' ');  // more than one read
  std::ofstream(file) << text;
  auto read = ReadRegularFile(file, "'adapter_config.json'");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, text);

  const std::string pipe = (folder / "pipe.json").string();
  ASSERT_EQ(::mkfifo(pipe.c_str(), 0600), 0);
  auto fifo = ReadRegularFile(pipe, "'pipe.json'");
  ASSERT_TRUE(absl::IsInvalidArgument(fifo.status())) << fifo.status();
  EXPECT_NE(fifo.status().message().find("'pipe.json' is a named pipe (FIFO)"), std::string::npos)
      << fifo.status();
  auto dir = ReadRegularFile(folder.string(), "'folder'");
  EXPECT_NE(dir.status().message().find("'folder' is a directory"), std::string::npos)
      << dir.status();
  EXPECT_TRUE(absl::IsNotFound(ReadRegularFile((folder / "gone").string(), "'gone'").status()));
}

// ReplaceFolder (durable_file.h), which every writer of a whole folder (an adapter, a checkpoint,
// a merged export) replaces an existing one with: the new folder takes the name, the old one is
// gone with nothing left beside it, and a folder it cannot replace is an error that changes
// nothing.
TEST(ReplaceFolderTest, TheNewFolderTakesTheNameAndTheOldOneGoes) {
  const fs::path root = fs::path(::testing::TempDir()) / "lorad-replace-folder-test";
  fs::remove_all(root);
  fs::create_directories(root / "old");
  fs::create_directories(root / "new");
  std::ofstream(root / "old" / "file") << "old";
  std::ofstream(root / "new" / "file") << "new";
  ASSERT_TRUE(ReplaceFolder((root / "new").string(), (root / "old").string()).ok());
  std::string text;
  std::ifstream(root / "old" / "file") >> text;
  EXPECT_EQ(text, "new");
  std::vector<std::string> left;
  for (const auto& entry : fs::directory_iterator(root)) {
    left.push_back(entry.path().filename().string());
  }
  EXPECT_EQ(left, std::vector<std::string>{"old"}) << "the old folder or a temporary is left";
  fs::create_directories(root / "new");
  const absl::Status missing =
      ReplaceFolder((root / "new").string(), (root / "nothing-here").string());
  EXPECT_FALSE(missing.ok());
  EXPECT_TRUE(fs::exists(root / "new")) << "a failed replace removed its source";
  EXPECT_FALSE(fs::exists(root / "nothing-here"));
}

// ScopedConfinedReads: under its root, a file opens as what it resolves to inside the root
// (symlinks that stay inside, as a Hugging Face cache's, are followed); one leading outside, as a
// folder swapped for a symlink after its path was checked, is refused and not read. Paths
// outside the root, and reads without one, are as before.
TEST(ScopedConfinedReadsTest, ReadsUnderTheRootStayInsideIt) {
  const fs::path base = fs::path(::testing::TempDir()) / "lorad-confined-reads-test";
  fs::remove_all(base);
  const fs::path root = base / "adapters";
  fs::create_directories(root / "real");
  fs::create_directories(base / "outside");
  std::ofstream(root / "real" / "adapter_config.json") << "inside";
  std::ofstream(base / "outside" / "adapter_config.json") << "secret";
  fs::create_directory_symlink(root / "real", root / "linked");      // inside: followed
  fs::create_directory_symlink(base / "outside", root / "swapped");  // outside: refused
  const std::string swapped = (root / "swapped" / "adapter_config.json").string();
  {
    const ScopedConfinedReads confined(root.string());
    auto linked = ReadRegularFile((root / "linked" / "adapter_config.json").string(), "config");
    ASSERT_TRUE(linked.ok()) << linked.status();
    EXPECT_EQ(*linked, "inside");
    auto refused = ReadRegularFile(swapped, "'" + swapped + "'");
    ASSERT_TRUE(absl::IsPermissionDenied(refused.status())) << refused.status();
    EXPECT_NE(refused.status().message().find("now leads outside"), std::string::npos)
        << refused.status();
    EXPECT_EQ(refused.status().message().find("secret"), std::string::npos);
    auto elsewhere = ReadRegularFile((base / "outside" / "adapter_config.json").string(), "x");
    EXPECT_TRUE(elsewhere.ok()) << elsewhere.status();  // not under the root
  }
  auto after = ReadRegularFile(swapped, "x");  // no longer confined
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(*after, "secret");
}

}  // namespace
}  // namespace lorad::engine
