#include "engine/model/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <new>

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) / "safetensors_test" /
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }

  std::string PathOf(const std::string& name) const { return (dir_ / name).string(); }

  std::string WriteBytes(const std::string& name, const std::string& bytes) {
    const std::string path = PathOf(name);
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }

  // A file with the given header text (unpadded) and data section.
  std::string WriteRaw(const std::string& name, const std::string& header,
                       const std::string& data = "") {
    const uint64_t n = header.size();
    std::string bytes(8, '\0');
    std::memcpy(bytes.data(), &n, 8);
    return WriteBytes(name, bytes + header + data);
  }

  static std::string ReadBytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  // Opens `path` and expects an error whose message names the file and contains `what`.
  static void ExpectError(const std::string& path, const std::string& what) {
    auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok()) << "opened a bad file: " << path;
    EXPECT_THAT(std::string(file.status().message()), HasSubstr(path));
    EXPECT_THAT(std::string(file.status().message()), HasSubstr(what));
  }

  fs::path dir_;
};

TensorView View(const std::string& name, DType dtype, std::vector<int64_t> shape, const void* data,
                size_t nbytes) {
  TensorView v;
  v.name = name;
  v.dtype = dtype;
  v.shape = std::move(shape);
  v.data = static_cast<const uint8_t*>(data);
  v.nbytes = nbytes;
  return v;
}

TEST(DTypeTest, NamesAndSizesRoundTrip) {
  const std::vector<std::pair<std::string, size_t>> expected = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
      {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};
  for (const auto& [name, size] : expected) {
    auto d = DTypeFromName(name);
    ASSERT_TRUE(d.ok()) << name;
    EXPECT_EQ(DTypeName(*d), name);
    EXPECT_EQ(DTypeSize(*d), size) << name;
  }
  auto bad = DTypeFromName("Q4_K");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("Q4_K"));
}

TEST_F(SafetensorsTest, WriteThenReadKeepsEveryTensorAndMetadata) {
  const std::vector<float> f32 = {1.5f, -2.25f, 3.0f, 0.0f, 1e-30f, -7.0f};
  const std::vector<uint16_t> f16 = {0x3c00, 0xc000, 0x7bff};  // odd count: tests alignment
  const std::vector<int64_t> i64 = {INT64_MIN, -1, INT64_MAX};
  const std::vector<uint8_t> flags = {1, 0, 1, 1};
  const std::vector<TensorView> tensors = {
      View("half", DType::kF16, {3}, f16.data(), 6),
      View("weight", DType::kF32, {2, 3}, f32.data(), 24),
      View("empty", DType::kF32, {0, 4}, nullptr, 0),
      View("ids", DType::kI64, {3}, i64.data(), 24),
      View("mask", DType::kBool, {2, 2}, flags.data(), 4),
      View("scalar", DType::kF32, {}, f32.data(), 4),
  };
  const std::string path = PathOf("model.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}, {"note", "ünïcode"}}).ok());

  // Mapped, or read into memory (adapters: a mapped file that shrinks would kill the process).
  for (const auto access : {SafetensorsFile::Access::kMap, SafetensorsFile::Access::kRead}) {
    auto file = SafetensorsFile::Open(path, access);
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_EQ((*file)->metadata(),
              (std::map<std::string, std::string>{{"format", "pt"}, {"note", "ünïcode"}}));
    ASSERT_EQ((*file)->tensors().size(), tensors.size());
    for (const auto& want : tensors) {
      const TensorView* got = (*file)->Find(want.name);
      ASSERT_NE(got, nullptr) << want.name;
      EXPECT_EQ(got->dtype, want.dtype) << want.name;
      EXPECT_EQ(got->shape, want.shape) << want.name;
      ASSERT_EQ(got->nbytes, want.nbytes) << want.name;
      if (want.nbytes > 0) {
        EXPECT_EQ(std::memcmp(got->data, want.data, want.nbytes), 0) << want.name;
      }
      // The data is aligned for its dtype even after the odd-sized F16 tensor.
      EXPECT_EQ(reinterpret_cast<uintptr_t>(got->data) % DTypeSize(got->dtype), 0u) << want.name;
    }
    EXPECT_EQ((*file)->Find("missing"), nullptr);
  }

  // The header is padded to 8 bytes with spaces, as the Python library writes it.
  const std::string bytes = ReadBytes(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + header_len + 6 + 24 + 24 + 4 + 4);
}

TEST_F(SafetensorsTest, WriteReplacesAnExistingFileAndLeavesNoTempFiles) {
  const float one = 1, two = 2;
  const std::string path = PathOf("w.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {View("x", DType::kF32, {1}, &one, 4)}).ok());
  ASSERT_TRUE(WriteSafetensors(path, {View("x", DType::kF32, {1}, &two, 4)}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  float got = 0;
  std::memcpy(&got, (*file)->Find("x")->data, 4);
  EXPECT_EQ(got, 2.0f);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);
}

TEST_F(SafetensorsTest, WriteRejectsBadInputAndWritesNothing) {
  const float v[4] = {1, 2, 3, 4};
  const std::string path = PathOf("bad.safetensors");
  struct Case {
    std::vector<TensorView> tensors;
    std::string what;
  };
  const std::vector<Case> cases = {
      {{View("a", DType::kF32, {1}, v, 4), View("a", DType::kF32, {1}, v, 4)}, "twice"},
      {{View("", DType::kF32, {1}, v, 4)}, "empty tensor name"},
      {{View("__metadata__", DType::kF32, {1}, v, 4)}, "reserved"},
      {{View("a", DType::kF32, {2, 2}, v, 12)}, "needs 16 bytes, got 12"},
      {{View("a", DType::kF32, {-1}, v, 4)}, "invalid shape"},
      {{View("\xff\xfe", DType::kF32, {1}, v, 4)}, "UTF-8"},
  };
  for (const auto& c : cases) {
    auto s = WriteSafetensors(path, c.tensors);
    ASSERT_FALSE(s.ok()) << c.what;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.what));
  }
  EXPECT_TRUE(fs::is_empty(dir_));  // no temp file or partial output left behind
  auto s =
      WriteSafetensors(PathOf("no/such/folder/x.safetensors"), {View("a", DType::kF32, {1}, v, 4)});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("no/such/folder"));
}

// A merged model is written tensor by tensor (WriteSafetensorsStreaming): the file equals the one
// written from memory, whatever pieces the bytes come in, and a producer that fails, or gives too
// few or too many bytes, leaves nothing behind.
TEST_F(SafetensorsTest, StreamedWriteEqualsTheWriteFromMemoryAndAFailedOneLeavesNothing) {
  const std::vector<float> f32 = {1.5f, -2.25f, 3.0f, 0.0f, 1e-30f, -7.0f};
  const std::vector<uint16_t> f16 = {0x3c00, 0xc000, 0x7bff};
  const std::vector<TensorView> tensors = {View("half", DType::kF16, {3}, f16.data(), 6),
                                           View("weight", DType::kF32, {2, 3}, f32.data(), 24),
                                           View("empty", DType::kF32, {0}, nullptr, 0)};
  const std::string from_memory = PathOf("memory.safetensors");
  ASSERT_TRUE(WriteSafetensors(from_memory, tensors, {{"format", "pt"}}).ok());

  // The producer is told only names and shapes (no data), and gives the bytes one at a time.
  std::vector<TensorView> planned = tensors;
  for (auto& t : planned) t.data = nullptr;
  std::vector<std::string> asked;
  const std::string streamed = PathOf("streamed.safetensors");
  const auto one_byte_at_a_time = [&](const TensorView& t, const TensorBytesSink& write) {
    asked.push_back(t.name);
    const TensorView* source = nullptr;
    for (const auto& s : tensors) source = s.name == t.name ? &s : source;
    for (size_t i = 0; i < t.nbytes; ++i) {
      if (auto s = write(source->data + i, 1); !s.ok()) return s;
    }
    return absl::OkStatus();
  };
  ASSERT_TRUE(
      WriteSafetensorsStreaming(streamed, planned, {{"format", "pt"}}, one_byte_at_a_time).ok());
  EXPECT_EQ(ReadBytes(streamed), ReadBytes(from_memory));
  EXPECT_EQ(asked, (std::vector<std::string>{"weight", "empty", "half"}));  // file order

  const std::string failed = PathOf("failed.safetensors");
  struct Case {
    TensorBytesProducer produce;
    std::string what;
  };
  const std::vector<Case> cases = {
      {[](const TensorView& t, const TensorBytesSink&) {
         return absl::CancelledError("abandoned at " + t.name);
       },
       "abandoned at weight"},
      {[&](const TensorView& t, const TensorBytesSink& write) {
         return t.nbytes == 0 ? absl::OkStatus()
                              : write(reinterpret_cast<const uint8_t*>(f32.data()), t.nbytes - 1);
       },
       "gave 23 of its 24 bytes"},
      {[&](const TensorView& t, const TensorBytesSink& write) {
         return write(reinterpret_cast<const uint8_t*>(f32.data()), t.nbytes + 1);
       },
       "more than its 24 bytes"},
      // A producer that throws (a merge out of memory): the file is abandoned, not left open.
      {[](const TensorView&, const TensorBytesSink&) -> absl::Status { throw std::bad_alloc(); },
       "making tensor 'weight': std::bad_alloc"},
  };
  for (const auto& c : cases) {
    auto s = WriteSafetensorsStreaming(failed, planned, {}, c.produce);
    ASSERT_FALSE(s.ok()) << c.what;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.what));
  }
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 2)
      << "a failed write left a file behind";
}

TEST_F(SafetensorsTest, MissingFileAndFolderAreErrors) {
  ExpectError(PathOf("absent.safetensors"), "does not exist");
  ExpectError(dir_.string(), "is a directory; name a regular file");
  ExpectError(WriteBytes("empty.safetensors", ""), "too short");
  // `git clone` without git-lfs: a text pointer in the weights' place (its first bytes read as a
  // header length of 2.3e18 bytes).
  ExpectError(
      WriteBytes("pointer.safetensors",
                 "version https://git-lfs.example/spec/v1\n"
                 "oid sha256:4d7a2146b5a0e5c4e8a5f3b3b6a1a2c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5\n"
                 "size 2471645608\n"),
      "is a git-lfs pointer, not the weights");
}

TEST_F(SafetensorsTest, TruncatedFileIsAnErrorAtEveryCutPoint) {
  const std::vector<float> w(16, 0.5f);
  const std::string full_path = PathOf("full.safetensors");
  ASSERT_TRUE(WriteSafetensors(full_path, {View("a", DType::kF32, {4, 2}, w.data(), 32),
                                           View("b", DType::kF32, {8}, w.data(), 32)})
                  .ok());
  const std::string full = ReadBytes(full_path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, full.data(), 8);
  const std::vector<std::pair<size_t, std::string>> cuts = {
      {0, "too short"},
      {5, "too short"},
      {8, "runs past the end of the file"},
      {8 + header_len / 2, "runs past the end of the file"},  // inside the header
      {8 + header_len - 1, "runs past the end of the file"},
      {8 + header_len, "past the end of the data section"},  // header intact, no data
      {8 + header_len + 20, "past the end of the data section"},
      {full.size() - 1, "past the end of the data section"},
  };
  for (const auto& [cut, what] : cuts) {
    SCOPED_TRACE("cut at " + std::to_string(cut));
    ExpectError(WriteBytes("cut.safetensors", full.substr(0, cut)), what);
  }
}

TEST_F(SafetensorsTest, HeaderLengthBeyondLimitOrFileIsAnError) {
  std::string bytes(8, '\0');
  const uint64_t huge = uint64_t{1} << 62;
  std::memcpy(bytes.data(), &huge, 8);
  ExpectError(WriteBytes("huge.safetensors", bytes + "{}"), "exceeds the limit");
  const uint64_t beyond = 4096;
  std::memcpy(bytes.data(), &beyond, 8);
  ExpectError(WriteBytes("beyond.safetensors", bytes + "{}      "),
              "runs past the end of the file");
}

TEST_F(SafetensorsTest, HeaderThatIsNotAJsonObjectIsAnError) {
  ExpectError(WriteRaw("garbage.safetensors", "this is not json"), "not a JSON object");
  ExpectError(WriteRaw("array.safetensors", "[1, 2, 3]"), "not a JSON object");
  ExpectError(WriteRaw("cut.safetensors", "{\"a\": {\"dtype\": \"F32\""), "not a JSON object");
  ExpectError(WriteRaw("utf8.safetensors", "{\"\xff\": 1}"), "not a JSON object");
  ExpectError(WriteRaw("entry.safetensors", R"({"a": 7})"), "tensor 'a': header entry is not");
  ExpectError(WriteRaw("meta.safetensors", R"({"__metadata__": {"k": 1}})"), "'k' is not a string");
  // A shape nested a million levels deep: refused before it is parsed (printing it in the error
  // recursed a level a frame and ran the stack out).
  const std::string deep = std::string(1000000, '[') + std::string(1000000, ']');
  ExpectError(WriteRaw("deep.safetensors", "{\"a\": {\"dtype\": \"F32\", \"shape\": " + deep +
                                               ", \"data_offsets\": [0, 4]}}"),
              "nested more than 64 levels");
}

TEST_F(SafetensorsTest, BadTensorEntriesNameTheTensorAndTheProblem) {
  const std::string data(64, '\0');
  struct Case {
    std::string header;
    std::string what;
  };
  const std::vector<Case> cases = {
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
       "tensors 'w' and 'v' overlap"},
      {R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
           "v": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
       "overlap"},
      {R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
           "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}})",
       "overlap"},
      {R"({"w": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}})",
       "tensor 'w': data_offsets [0, 128] run past the end of the data section (64 bytes)"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [18446744073709551608, 0]}})",
       "end before they begin"},
      {R"({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})",
       "tensor 'w': unknown dtype 'F8_E4M3'"},
      {R"({"w": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}})", "'dtype' missing"},
      {R"({"w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 8]}})",
       "hold 8 bytes but shape [2, 3] of F16 needs 12"},
      {R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", "non-negative"},
      {R"({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 8]}})", "non-negative"},
      {R"({"w": {"dtype": "F32", "shape": [4611686018427387904, 4611686018427387904],
                 "data_offsets": [0, 8]}})",
       "overflows"},
      {R"({"w": {"dtype": "F32", "data_offsets": [0, 8]}})", "'shape' missing"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", "'data_offsets' must be"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})",
       "'data_offsets' must be"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
       "tensor 'w' appears twice"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].header);
    ExpectError(WriteRaw("case" + std::to_string(i) + ".safetensors", cases[i].header, data),
                cases[i].what);
  }
}

TEST_F(SafetensorsTest, AdjacentRangesEmptyTensorsAndHolesAreAccepted) {
  const std::string data(24, '\x01');
  auto file = SafetensorsFile::Open(WriteRaw("ok.safetensors", R"({
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
      "e": {"dtype": "I8", "shape": [0, 3], "data_offsets": [8, 8]},
      "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
      "c": {"dtype": "I16", "shape": [2], "data_offsets": [20, 24]},
      "__metadata__": null})",
                                             data));
  ASSERT_TRUE(file.ok()) << file.status();
  // names() is data order, whatever order the header lists them in.
  EXPECT_EQ((*file)->names(), (std::vector<std::string>{"a", "e", "b", "c"}));
  EXPECT_EQ((*file)->Find("e")->numel(), 0);
  EXPECT_TRUE((*file)->metadata().empty());
}

// Every single-byte corruption of a small file's length and header is either read or refused
// with an error: none crashes or reads outside the file (run under ASan to see the latter).
TEST_F(SafetensorsTest, CorruptingAnyHeaderByteNeverCrashes) {
  const std::vector<int32_t> v = {1, 2, 3, 4};
  const std::string path = PathOf("seed.safetensors");
  ASSERT_TRUE(WriteSafetensors(path,
                               {View("ab", DType::kI32, {2, 2}, v.data(), 16),
                                View("c", DType::kI16, {2}, v.data(), 4)},
                               {{"k", "v"}})
                  .ok());
  const std::string good = ReadBytes(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, good.data(), 8);
  // Overwrite one byte in place and put it back, rather than rewrite the file per mutant.
  std::fstream mutant(path, std::ios::in | std::ios::out | std::ios::binary);
  auto put = [&](size_t pos, char c) {
    mutant.seekp(static_cast<std::streamoff>(pos));
    mutant.put(c);
    mutant.flush();
  };
  int refused = 0;
  uint64_t checksum = 0;
  for (size_t pos = 0; pos < 8 + header_len; ++pos) {
    for (unsigned char value : {0x00, 0x22, 0x2c, 0x39, 0x5d, 0x7d, 0xff}) {
      put(pos, static_cast<char>(value));
      auto file = SafetensorsFile::Open(path);
      if (!file.ok()) {
        ++refused;
        continue;
      }
      // Touch every byte of every view: a view reaching outside the mapping would fault here.
      for (const auto& t : (*file)->tensors()) {
        ASSERT_LE(t.nbytes, good.size());
        for (size_t i = 0; i < t.nbytes; ++i) checksum += t.data[i];
      }
    }
    put(pos, good[pos]);
  }
  EXPECT_GT(refused, 0);
  EXPECT_GT(checksum, 0u);  // some mutants (e.g. in metadata text) are still valid files
}

}  // namespace
}  // namespace lorad::engine
