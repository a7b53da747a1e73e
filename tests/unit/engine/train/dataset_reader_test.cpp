#include "engine/train/dataset_reader.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/match.h"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;

class DatasetReaderTest : public ::testing::Test {
 protected:
  std::string Write(const std::string& name, const std::string& body) {
    const auto dir = std::filesystem::path(::testing::TempDir()) / "dataset_reader_test";
    std::filesystem::create_directories(dir);
    const std::string path = (dir / name).string();
    std::filesystem::create_directories(std::filesystem::path(path).parent_path());
    std::ofstream(path, std::ios::binary) << body;
    return path;
  }
  // With skip_bad_lines, `path` reads as `kept` examples with `skipped` records skipped.
  static void ExpectSkipping(const std::string& path, size_t kept, int64_t skipped) {
    DatasetReaderOptions skip;
    skip.skip_bad_lines = true;
    int64_t counted = 0;
    auto examples = ReadDataset(path, skip, &counted);
    ASSERT_TRUE(examples.ok()) << examples.status();
    EXPECT_EQ(examples->size(), kept);
    EXPECT_EQ(counted, skipped);
  }
};

TEST_F(DatasetReaderTest, JsonlWithEveryFormatDetected) {
  const std::string path = Write("all.jsonl",
                                 R"({"instruction": "Add", "input": "2 and 3", "output": "5"}
{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}

{"prompt": "The sky is", "completion": " blue"}
{"text": "Plain text."}
{"question": "Capital of France?", "answer": "Paris", "source": "ignored"}
)");
  auto examples = ReadDataset(path);
  ASSERT_TRUE(examples.ok()) << examples.status();
  ASSERT_EQ(examples->size(), 5u);
  const auto& alpaca = (*examples)[0];
  EXPECT_EQ(alpaca.format, DatasetFormat::kAlpaca);
  EXPECT_EQ(alpaca.instruction, "Add");
  EXPECT_EQ(alpaca.messages[0].content, "Add\n\n2 and 3");
  EXPECT_EQ(alpaca.messages[1].role, "assistant");
  EXPECT_EQ((*examples)[1].format, DatasetFormat::kChat);
  EXPECT_EQ((*examples)[1].messages.size(), 3u);
  EXPECT_EQ((*examples)[2].format, DatasetFormat::kCompletion);
  EXPECT_EQ((*examples)[2].line, 4);  // the blank line 3 is skipped but counted
  EXPECT_EQ((*examples)[3].text, "Plain text.");
  EXPECT_EQ((*examples)[4].messages[1].content, "Paris");
}

TEST_F(DatasetReaderTest, JsonArrayIsReadElementByElementWithLines) {
  const std::string path = Write("array.json",
                                 "[\n  {\"text\": \"a, [b] {c}\"},\n"
                                 "  {\"text\": \"quote \\\" inside\"}\n]\n");
  auto examples = ReadDataset(path);
  ASSERT_TRUE(examples.ok()) << examples.status();
  ASSERT_EQ(examples->size(), 2u);
  EXPECT_EQ((*examples)[0].text, "a, [b] {c}");
  EXPECT_EQ((*examples)[1].text, "quote \" inside");
  EXPECT_EQ((*examples)[1].line, 3);
}

TEST_F(DatasetReaderTest, MalformedLineNamesFileLineAndField) {
  const std::string path = Write("bad.jsonl",
                                 "{\"text\": \"ok\"}\n{\"prompt\": \"p\", "
                                 "\"completion\": 7}\n");
  auto examples = ReadDataset(path);
  ASSERT_FALSE(examples.ok());
  const std::string message(examples.status().message());
  EXPECT_NE(message.find(path + ":2"), std::string::npos) << message;
  EXPECT_NE(message.find("'completion'"), std::string::npos) << message;
}

// A request's inline records (written one a line) are named as the request has them, 0-based.
TEST_F(DatasetReaderTest, InlineRecordsAreNamedByTheirIndex) {
  const std::string path = Write("inline_dataset.jsonl",
                                 "{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"prompt\": \"p\"}\n");
  DatasetReaderOptions options;
  options.inline_name = "dataset.inline_examples";
  auto examples = ReadDataset(path, options);
  ASSERT_FALSE(examples.ok());
  const std::string message(examples.status().message());
  EXPECT_EQ(message.rfind("dataset.inline_examples[2]: ", 0), 0u) << message;
  EXPECT_EQ(message.find(path), std::string::npos) << message;
}

// A record nested deeper than any dataset needs is a bad record naming its line, refused before it
// is parsed (printing such a value in an error recursed a level a frame).
TEST_F(DatasetReaderTest, ARecordNestedTooDeepIsABadRecord) {
  const std::string deep = std::string(200000, '[') + std::string(200000, ']');
  const std::string path =
      Write("deep.jsonl", "{\"text\": \"ok\"}\n{\"text\": " + deep + "}\n{\"text\": \"b\"}\n");
  auto examples = ReadDataset(path);
  ASSERT_FALSE(examples.ok());
  EXPECT_NE(examples.status().message().find(path + ":2: JSON nested more than 64 levels deep"),
            std::string::npos)
      << examples.status().message().substr(0, 300);
  ExpectSkipping(path, 2, 1);
}

TEST_F(DatasetReaderTest, ChatRoleAndMissingAssistantAreErrors) {
  auto bad_role = DatasetReader::ParseRecord(R"({"messages": [{"role": "robot", "content": "x"}]})",
                                             DatasetFormat::kAuto, "f:1");
  ASSERT_FALSE(bad_role.ok());
  EXPECT_NE(bad_role.status().message().find("messages[0].role"), std::string::npos);
  auto no_assistant = DatasetReader::ParseRecord(
      R"({"messages": [{"role": "user", "content": "x"}]})", DatasetFormat::kChat, "f:1");
  ASSERT_FALSE(no_assistant.ok());
  EXPECT_NE(no_assistant.status().message().find("no assistant"), std::string::npos);
}

// ShareGPT's {"conversations": [{"from", "value"}]} (system/human/gpt) is a chat record: the
// same messages as its {role, content} spelling, and its errors name its own fields.
TEST_F(DatasetReaderTest, ShareGptConversationsAreChatRecords) {
  auto share = DatasetReader::ParseRecord(
      R"({"conversations": [{"from": "system", "value": "Be brief."},
                            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                            {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]})",
      DatasetFormat::kAuto, "f:1");
  ASSERT_TRUE(share.ok()) << share.status();
  auto same = DatasetReader::ParseRecord(
      R"({"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                       {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]})",
      DatasetFormat::kAuto, "f:1");
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_EQ(share->format, DatasetFormat::kChat);
  ASSERT_EQ(share->messages.size(), same->messages.size());
  for (size_t i = 0; i < same->messages.size(); ++i) {
    EXPECT_EQ(share->messages[i].role, same->messages[i].role) << i;
    EXPECT_EQ(share->messages[i].content, same->messages[i].content) << i;
  }
  // The same turns spelled {role, content} under "conversations" (Unsloth's
  // standardize_sharegpt writes them so).
  auto standardized = DatasetReader::ParseRecord(
      R"({"conversations": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                       {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]})",
      DatasetFormat::kAuto, "f:1");
  ASSERT_TRUE(standardized.ok()) << standardized.status();
  ASSERT_EQ(standardized->messages.size(), same->messages.size());
  for (size_t i = 0; i < same->messages.size(); ++i) {
    EXPECT_EQ(standardized->messages[i].role, same->messages[i].role) << i;
    EXPECT_EQ(standardized->messages[i].content, same->messages[i].content) << i;
  }
  auto bad = DatasetReader::ParseRecord(R"({"conversations": [{"from": "bot", "value": "x"}]})",
                                        DatasetFormat::kChat, "f:1");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find(
                "field 'conversations[0].from' is 'bot'; expected system, human or gpt"),
            std::string::npos)
      << bad.status();
}

// TRL's conversational prompt-completion: message lists; the completion's assistant turns train.
TEST_F(DatasetReaderTest, ConversationalPromptCompletionIsOneConversation) {
  auto ex = DatasetReader::ParseRecord(
      R"({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}],
          "completion": [{"role": "assistant", "content": "d"}]})",
      DatasetFormat::kAuto, "f:1");
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ(ex->format, DatasetFormat::kCompletion);
  ASSERT_EQ(ex->messages.size(), 4u);
  EXPECT_EQ(ex->messages[3].content, "d");
  EXPECT_EQ(ex->first_trained_message, 3u);
  auto no_reply = DatasetReader::ParseRecord(
      R"({"prompt": [{"role": "user", "content": "a"}],
          "completion": [{"role": "user", "content": "d"}]})",
      DatasetFormat::kCompletion, "f:2");
  ASSERT_FALSE(no_reply.ok());
  EXPECT_NE(no_reply.status().message().find("'completion' has no assistant message"),
            std::string::npos)
      << no_reply.status();
}

TEST_F(DatasetReaderTest, SkipBadLinesCountsThem) {
  const std::string path =
      Write("mixed.jsonl", "{\"text\": \"a\"}\nnot json\n{\"unknown\": 1}\n{\"text\": \"b\"}\n");
  DatasetReaderOptions options;
  options.skip_bad_lines = true;
  int64_t skipped = 0;
  auto examples = ReadDataset(path, options, &skipped);
  ASSERT_TRUE(examples.ok()) << examples.status();
  EXPECT_EQ(examples->size(), 2u);
  EXPECT_EQ(skipped, 2);
  // CountDataset (the submit-time check) counts the same without keeping the records.
  int64_t count_skipped = 0;
  auto count = CountDataset(path, options, &count_skipped);
  ASSERT_TRUE(count.ok()) << count.status();
  EXPECT_EQ(*count, 2);
  EXPECT_EQ(count_skipped, 2);
  auto strict = CountDataset(path);
  ASSERT_FALSE(strict.ok());
  EXPECT_EQ(strict.status().message(), ReadDataset(path).status().message());
}

TEST_F(DatasetReaderTest, ExplicitFormatRequiresItsFields) {
  const std::string path = Write("alpaca.jsonl", "{\"text\": \"no instruction here\"}\n");
  DatasetReaderOptions options;
  options.format = DatasetFormat::kAlpaca;
  auto examples = ReadDataset(path, options);
  ASSERT_FALSE(examples.ok());
  EXPECT_NE(examples.status().message().find("'instruction' is missing"), std::string::npos);
}

TEST_F(DatasetReaderTest, UnclosedArrayAndEmptyFileAreErrors) {
  EXPECT_FALSE(ReadDataset(Write("open.json", "[{\"text\": \"a\"}")).ok());
  EXPECT_FALSE(ReadDataset(Write("cut.json", "[{\"text\": \"a")).ok());
  auto empty = ReadDataset(Write("empty.jsonl", "\n\n"));
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(empty.status().message().find("no usable records"), std::string::npos);
  EXPECT_TRUE(absl::IsNotFound(ReadDataset("/nonexistent/data.jsonl").status()));
}

TEST_F(DatasetReaderTest, OversizedRecordIsAnError) {
  DatasetReaderOptions options;
  options.max_record_bytes = 16;
  auto examples =
      ReadDataset(Write("big.json", "[{\"text\": \"" + std::string(100, 'x') + "\"}]"), options);
  ASSERT_FALSE(examples.ok());
  EXPECT_NE(examples.status().message().find("larger than 16 bytes"), std::string::npos);
}

TEST_F(DatasetReaderTest, OversizedJsonlLineIsABadRecordThatCanBeSkipped) {
  DatasetReaderOptions options;
  options.max_record_bytes = 32;
  const std::string path =
      Write("big.jsonl", "{\"text\": \"" + std::string(100, 'x') + "\"}\n{\"text\": \"ok\"}\n");
  auto strict = ReadDataset(path, options);
  ASSERT_FALSE(strict.ok());
  EXPECT_NE(strict.status().message().find(path + ":1"), std::string::npos) << strict.status();
  EXPECT_NE(strict.status().message().find("larger than 32 bytes"), std::string::npos);
  options.skip_bad_lines = true;
  int64_t skipped = 0;
  auto lenient = ReadDataset(path, options, &skipped);
  ASSERT_TRUE(lenient.ok()) << lenient.status();
  EXPECT_EQ(lenient->size(), 1u);
  EXPECT_EQ(skipped, 1);
}

// The array forms Python's json.load refuses are errors naming the line; a byte order mark is not.
TEST_F(DatasetReaderTest, ArraysAreReadAsStrictlyAsPythonJson) {
  auto bom =
      ReadDataset(Write("bom.json", "\xEF\xBB\xBF[\n{\"text\": \"a\"},\n{\"text\": \"b\"}\n]\n"));
  ASSERT_TRUE(bom.ok()) << bom.status();
  EXPECT_EQ(bom->size(), 2u);
  auto bom_jsonl = ReadDataset(Write("bom.jsonl", "\xEF\xBB\xBF{\"text\": \"a\"}\n"));
  ASSERT_TRUE(bom_jsonl.ok()) << bom_jsonl.status();
  const struct {
    const char* name;
    const char* body;
    const char* words;
  } cases[] = {
      {"trailing.json", "[{\"text\": \"a\"},\n]", "trailing comma"},
      {"missing.json", "[{\"text\": \"a\"}\n {\"text\": \"b\"}]", "expected ',' or ']'"},
      {"after.json", "[{\"text\": \"a\"}]\ngarbage", "after the JSON array"},
      {"double.json", "[{\"text\": \"a\"},,{\"text\": \"b\"}]", "where a record belongs"},
      {"leading.json", "[,{\"text\": \"a\"}]", "where a record belongs"},
  };
  for (const auto& c : cases) {
    const std::string path = Write(c.name, c.body);
    auto examples = ReadDataset(path);
    ASSERT_FALSE(examples.ok()) << c.name;
    const std::string message(examples.status().message());
    EXPECT_NE(message.find(c.words), std::string::npos) << message;
    EXPECT_NE(message.find(path + ":"), std::string::npos) << message;
  }
}

// What Python's json.dumps writes beyond JSON reads as json.loads reads it: NaN and Infinity (a
// float in a record's metadata) and a lone surrogate escape (as U+FFFD). They were refused.
TEST_F(DatasetReaderTest, WhatPythonsJsonWritesBeyondJsonIsRead) {
  auto examples = ReadDataset(Write(
      "python.jsonl",
      "{\"question\": \"q\", \"answer\": \"a\", \"score\": NaN, \"range\": [-Infinity, Infinity]}\n"
      "{\"question\": \"cut \\ud83d\", \"answer\": \"\\ud83d\\ude00 and \\\\ud800\"}\n"
      "{\"question\": \"lone low\", \"answer\": \"x\\udc00y\"}\n"));
  ASSERT_TRUE(examples.ok()) << examples.status();
  ASSERT_EQ(examples->size(), 3u);
  EXPECT_EQ((*examples)[1].messages[0].content, "cut \xEF\xBF\xBD");  // U+FFFD
  // A pair is one character (U+1F600); an escaped backslash before "ud800" is text.
  EXPECT_EQ((*examples)[1].messages[1].content, "\xF0\x9F\x98\x80 and \\ud800");
  EXPECT_EQ((*examples)[2].messages[1].content, "x\xEF\xBF\xBDy");
  // Inside a string the words stay, and text that is wrong in another way keeps its error.
  auto in_string =
      DatasetReader::ParseRecord(R"({"text": "NaN Infinity"})", DatasetFormat::kAuto, "f:1");
  ASSERT_TRUE(in_string.ok()) << in_string.status();
  EXPECT_EQ(in_string->text, "NaN Infinity");
  auto still_bad =
      DatasetReader::ParseRecord(R"({"text": "a", "x": NaN,})", DatasetFormat::kAuto, "f:1");
  ASSERT_FALSE(still_bad.ok());
  EXPECT_NE(still_bad.status().message().find("invalid literal"), std::string::npos)
      << still_bad.status();
}

// CSV and TSV by name, and a JSON array in a .jsonl file: what to do, not a parse error.
TEST_F(DatasetReaderTest, TablesAndArraysInJsonlFilesSayWhatToDo) {
  auto csv = ReadDataset(Write("data.csv", "question,answer\nq,a\n"));
  ASSERT_FALSE(csv.ok());
  EXPECT_NE(csv.status().message().find("is csv text: lorad reads UTF-8 JSON Lines or a JSON "
                                        "array; convert it first (e.g. pandas.read_csv(path)"),
            std::string::npos)
      << csv.status();
  auto tsv = ReadDataset(Write("data.TSV", "question\tanswer\n"));
  ASSERT_FALSE(tsv.ok());
  EXPECT_NE(tsv.status().message().find("sep='\\t'"), std::string::npos) << tsv.status();
  for (const char* body : {"[\n  {\"text\": \"a\"}\n]\n", "[{\"text\": \"a\"}]\n"}) {
    auto array = ReadDataset(Write("array.jsonl", body));
    ASSERT_FALSE(array.ok());
    EXPECT_NE(array.status().message().find("array.jsonl:1: "), std::string::npos);
    EXPECT_NE(array.status().message().find(
                  "; a .jsonl file is read line by line, one record a line: name a file holding "
                  "a JSON array .json"),
              std::string::npos)
        << array.status();
  }
}

TEST_F(DatasetReaderTest, InvalidJsonSaysWhy) {
  auto examples = ReadDataset(Write("utf8.jsonl", "{\"text\": \"caf\xE9\"}\n"));
  ASSERT_FALSE(examples.ok());
  const std::string message(examples.status().message());
  EXPECT_NE(message.find("not valid JSON ("), std::string::npos) << message;
  EXPECT_NE(message.find("UTF-8"), std::string::npos) << message;
  EXPECT_EQ(message.find("json.exception"), std::string::npos) << message;
}

// Files users have that are not what lorad reads are named for what they are.
TEST_F(DatasetReaderTest, CompressedAndUtf16FilesAreNamed) {
  for (const auto& [name, body, words] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"g.jsonl.gz", std::string("\x1F\x8B\x08\x00rest", 8), "gzip-compressed"},
           {"u.jsonl", std::string("\xFF\xFE{\0\"\0", 6), "UTF-16"},
           {"p.parquet", "PAR1....", "Parquet"}}) {
    auto examples = ReadDataset(Write(name, body));
    ASSERT_FALSE(examples.ok()) << name;
    EXPECT_NE(examples.status().message().find(words), std::string::npos) << examples.status();
  }
}

// nlohmann's parser stops at a NUL: the rest of the line would go unread, not refused.
TEST_F(DatasetReaderTest, ANulByteInALineIsAnError) {
  const std::string body = std::string("{\"text\": \"a\"}") + '\0' + "{\"text\": \"lost\"}\n";
  auto examples = ReadDataset(Write("nul.jsonl", body));
  ASSERT_FALSE(examples.ok());
  EXPECT_NE(
      examples.status().message().find("nul.jsonl:1: not valid JSON (a NUL byte at column 14)"),
      std::string::npos)
      << examples.status();
}

// A .jsonl file is JSON Lines: a bad first line that opens with '[' is one bad record (skipped
// when asked), not the start of a JSON array that swallows the rest.
TEST_F(DatasetReaderTest, AJsonlFileIsLinesEvenWhenItsFirstLineIsAnArray) {
  const std::string path =
      Write("first-array.jsonl", "[1, 2]\n{\"question\": \"q\", \"answer\": \"a\"}\n");
  DatasetReaderOptions options;
  options.skip_bad_lines = true;
  int64_t skipped = 0;
  auto examples = ReadDataset(path, options, &skipped);
  ASSERT_TRUE(examples.ok()) << examples.status();
  EXPECT_EQ(examples->size(), 1u);
  EXPECT_EQ(skipped, 1);
  EXPECT_EQ((*examples)[0].line, 2);
}

TEST_F(DatasetReaderTest, NullFieldsAndPrettyPrintedObjectsSayWhatIsWrong) {
  auto null_output = ReadDataset(
      Write("null.jsonl", "{\"instruction\": \"i\", \"input\": null, \"output\": null}\n"));
  ASSERT_FALSE(null_output.ok());
  EXPECT_NE(null_output.status().message().find("field 'output' is null; it must be a string"),
            std::string::npos)
      << null_output.status();
  auto pretty = ReadDataset(Write("pretty.json", "{\n  \"data\": [{\"text\": \"a\"}]\n}\n"));
  ASSERT_FALSE(pretty.ok());
  EXPECT_NE(pretty.status().message().find("pretty.json:1: not valid JSON"), std::string::npos)
      << pretty.status();
  EXPECT_NE(pretty.status().message().find("must be a JSON array of records"), std::string::npos)
      << pretty.status();
  // Every record skipped: the error says why the first one was.
  DatasetReaderOptions skip;
  skip.skip_bad_lines = true;
  auto none = ReadDataset(Write("none.jsonl", "{\"text\": 5}\n"), skip);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("the first: "), std::string::npos) << none.status();
  EXPECT_NE(none.status().message().find("field 'text' must be a string"), std::string::npos)
      << none.status();
}

TEST_F(DatasetReaderTest, AFirstLineWrongInAnotherWayIsNotCalledPrettyPrinted) {
  auto trailing = ReadDataset(Write("trailing.jsonl", "{\"text\": \"a\",}\n"));
  ASSERT_FALSE(trailing.ok());
  EXPECT_NE(trailing.status().message().find("trailing.jsonl:1: not valid JSON"), std::string::npos)
      << trailing.status();
  EXPECT_EQ(trailing.status().message().find("pretty-printed"), std::string::npos)
      << trailing.status();
}

// Python's json (so datasets and TRL) reads 1e400 as inf; nlohmann refuses it with an exception
// of its own kind (out_of_range, not parse_error), which escaped the reader and aborted it.
TEST_F(DatasetReaderTest, ANumberPastADoublesRangeIsABadRecord) {
  const std::string body =
      "{\"question\": \"q\", \"answer\": \"a\", \"score\": 1e400}\n"
      "{\"question\": \"q2\", \"answer\": \"a2\"}\n";
  const std::string path = Write("overflow.jsonl", body);
  auto strict = ReadDataset(path);
  ASSERT_FALSE(strict.ok());
  EXPECT_EQ(strict.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(strict.status().message().find("overflow.jsonl:1: not valid JSON"), std::string::npos)
      << strict.status();
  EXPECT_NE(strict.status().message().find("1e400"), std::string::npos) << strict.status();
  ExpectSkipping(path, 1, 1);
}

// A job's dataset path was resolved at submit (no symlink in it): a symlink put in its way since,
// in a folder or as the file itself, is refused when the job reads it, not followed out of the
// dataset root. Without the option (a path given as is) symlinks are followed.
TEST_F(DatasetReaderTest, AResolvedPathIsReadWithoutFollowingSymlinks) {
  // Where the kernel (or a container's seccomp profile) lacks openat2, the reader warns and
  // follows symlinks: nothing to check here then.
  open_how how{};
  how.flags = O_RDONLY | O_CLOEXEC;
  const long probe = syscall(SYS_openat2, AT_FDCWD, "/", &how, sizeof(how));
  if (probe < 0 && (errno == ENOSYS || errno == EPERM)) {
    GTEST_SKIP() << "openat2 is not available on this machine";
  }
  if (probe >= 0) close(static_cast<int>(probe));
  const fs::path file = Write("real/data.jsonl", "{\"text\": \"a\"}\n");
  const fs::path dir = file.parent_path().parent_path();
  fs::remove(dir / "through");
  fs::create_directory_symlink(dir / "real", dir / "through");
  fs::remove(dir / "link.jsonl");
  fs::create_symlink(file, dir / "link.jsonl");
  DatasetReaderOptions resolved;
  resolved.no_symlinks = true;
  EXPECT_TRUE(ReadDataset(file.string(), resolved).ok());
  for (const fs::path& path : {dir / "through" / "data.jsonl", dir / "link.jsonl"}) {
    auto refused = ReadDataset(path.string(), resolved);
    ASSERT_FALSE(refused.ok()) << path;
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kPermissionDenied) << refused.status();
    EXPECT_NE(refused.status().message().find("now leads through a symlink"), std::string::npos)
        << refused.status();
    EXPECT_TRUE(ReadDataset(path.string()).ok()) << path;
  }
}

TEST(DatasetFormat, NamesRoundTrip) {
  auto f = DatasetFormatFromName("qa");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(*f, DatasetFormat::kQa);
  EXPECT_FALSE(DatasetFormatFromName("csv").ok());
}

// Records as dataset exports write them: columns a record lacks as null (datasets' to_json,
// pandas), a "text" column Unsloth's notebooks map beside the Alpaca ones (TRL trains the text).
TEST_F(DatasetReaderTest, NullColumnsAreAbsentAndAPreparedTextWinsOverAlpacaColumns) {
  const std::string path =
      Write("exported.jsonl",
            "{\"messages\": null, \"prompt\": \"Q1\", \"completion\": \"A1\", \"text\": null}\n"
            "{\"instruction\": \"Add\", \"input\": \"2 and 3\", \"output\": \"5\", \"text\": \"### "
            "Instruction: Add 2 and 3\\n### Response: 5\"}\n"
            "{\"instruction\": \"Say hi\", \"output\": \"hi\", \"text\": null}\n");
  auto examples = ReadDataset(path);
  ASSERT_TRUE(examples.ok()) << examples.status();
  ASSERT_EQ(examples->size(), 3u);
  EXPECT_EQ((*examples)[0].format, DatasetFormat::kCompletion);
  EXPECT_EQ((*examples)[0].messages.back().content, "A1");
  EXPECT_EQ((*examples)[1].format, DatasetFormat::kText);
  EXPECT_EQ((*examples)[1].text, "### Instruction: Add 2 and 3\n### Response: 5");
  EXPECT_EQ((*examples)[2].format, DatasetFormat::kAlpaca);
}

// Tool calls and tool schemas are refused naming the field (lorad renders role and content
// only: a tool-calling turn would train as an empty reply), in chat and conversational
// prompt-completion records; an empty tool_calls list is no call.
TEST_F(DatasetReaderTest, ToolCallsAndToolSchemasAreRefusedNamingTheField) {
  const std::string calls =
      R"({"messages": [{"role": "user", "content": "Weather in Rome?"}, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": "{}"}}]}]})";
  const std::string tools =
      R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "tools": [{"type": "function", "function": {"name": "weather"}}]})";
  const std::string prompt_tools =
      R"({"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}], "tools": [{"type": "function"}]})";
  // What exports write for a column a record lacks: null, "", false, an empty list or "[]".
  const std::string no_calls =
      R"({"messages": [{"role": "user", "content": "Hi", "tool_calls": ""}, {"role": "assistant", "content": "Hello", "tool_calls": []}], "tools": null, "functions": false})"
      "\n"
      R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "tool_calls": "[]"}], "tools": ""})";
  for (const auto& [body, field] : std::vector<std::pair<std::string, std::string>>{
           {calls, "'messages[1].tool_calls'"}, {tools, "'tools'"}, {prompt_tools, "'tools'"}}) {
    auto examples = ReadDataset(Write("tools.jsonl", body + "\n"));
    ASSERT_FALSE(examples.ok()) << body;
    EXPECT_NE(examples.status().message().find("tools.jsonl:1: field " + field), std::string::npos)
        << examples.status();
    EXPECT_NE(examples.status().message().find("not supported"), std::string::npos)
        << examples.status();
  }
  auto plain = ReadDataset(Write("no-calls.jsonl", no_calls + "\n"));
  ASSERT_TRUE(plain.ok()) << plain.status();
  ASSERT_EQ(plain->size(), 2u);
  EXPECT_EQ((*plain)[0].messages.size(), 2u);
}

// A JSON array written on one line (json.dump, pandas' to_json): errors name the record's index
// in the array, and a record no format matches lists its keys; a JSONL line holding a bare list
// of messages is told to be wrapped as {"messages": [...]}.
TEST_F(DatasetReaderTest, ErrorsNameTheArrayRecordAndWhatTheRecordHolds) {
  auto typo = ReadDataset(Write(
      "one-line.json",
      R"([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e", "outptu": "f"}])"));
  ASSERT_FALSE(typo.ok());
  EXPECT_NE(typo.status().message().find("one-line.json:1 (record [2] of the array): record "
                                         "matches no known format"),
            std::string::npos)
      << typo.status();
  EXPECT_NE(typo.status().message().find("its keys: instruction, outptu"), std::string::npos)
      << typo.status();
  // An error between records names no record (it is none of them).
  const std::string trail = Write("trail.json", "[{\"text\": \"a\"},\n{\"text\": \"b\"}]\nx\n");
  auto trailing = ReadDataset(trail);
  ASSERT_FALSE(trailing.ok());
  EXPECT_TRUE(
      absl::StartsWith(trailing.status().message(), trail + ":3: text after the JSON array"))
      << trailing.status();
  // A record quoting megabytes (a long text the parser stops in) is named in a few hundred
  // bytes: a skipped one's reason is kept in its job's summary.
  DatasetReaderOptions skip;
  skip.skip_bad_lines = true;
  auto reader =
      DatasetReader::Open(Write("long-bad.jsonl", "{\"text\": \"" + std::string(100000, 'x') +
                                                      "\t\"}\n{\"text\": \"ok\"}\n"),
                          skip);
  ASSERT_TRUE(reader.ok()) << reader.status();
  auto good = (*reader)->Next();
  ASSERT_TRUE(good.ok() && good->has_value()) << good.status();
  EXPECT_EQ((*good)->record, 2);
  EXPECT_EQ((*reader)->first_skip_record(), 1);
  EXPECT_LT((*reader)->first_skip_reason().size(), 400u) << (*reader)->first_skip_reason();
  EXPECT_NE((*reader)->first_skip_reason().find("long-bad.jsonl:1: not valid JSON"),
            std::string::npos)
      << (*reader)->first_skip_reason();
  auto bare = ReadDataset(
      Write("bare.jsonl",
            R"([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])"
            "\n"));
  ASSERT_FALSE(bare.ok());
  EXPECT_NE(bare.status().message().find("write each line as {\"messages\": [...]}"),
            std::string::npos)
      << bare.status();
}

}  // namespace
}  // namespace lorad::engine
