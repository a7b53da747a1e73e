// DatasetReader: reads a fine-tuning dataset (JSONL, or a JSON array) one record at a time and
// turns each into an Example, whatever the source format. torch-free: the server validates
// datasets with it when a job is submitted.
//
// Formats (DatasetFormat::kAuto detects each record's format from its keys):
//   alpaca      {"instruction", "input"?, "output"}
//   chat        {"messages": [{"role": "system"|"user"|"assistant", "content"}...]}, or ShareGPT's
//               {"conversations": [{"from": "system"|"human"|"gpt", "value"}...]}
//   completion  {"prompt", "completion"}: strings, or lists of messages (TRL's conversational
//               prompt-completion: the completion's assistant turns train, not the prompt's)
//   text        {"text"}
//   qa          {"question", "answer"} (other fields ignored)
// A malformed record is an error naming the file, the line and the field; with skip_bad_lines the
// reader counts it and moves on.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model/chat_template.h"  // ChatMessage

namespace lorad::engine {

enum class DatasetFormat { kAuto, kAlpaca, kChat, kCompletion, kText, kQa };

// "auto", "alpaca", "chat", "completion", "text", "qa".
absl::StatusOr<DatasetFormat> DatasetFormatFromName(const std::string& name);
const char* DatasetFormatName(DatasetFormat format);

// One training record in a format-independent shape. Every format but text becomes a
// conversation whose assistant turns are the response (what response-only loss trains on).
// What a message about a bad record quotes of it at most: a record's text can be megabytes, and
// a skipped record's reason is kept in its job's summary, which every ListJobs page carries.
inline constexpr size_t kMaxSkipReasonBytes = 300;

struct Example {
  DatasetFormat format = DatasetFormat::kText;  // the record's own format (never kAuto)
  std::vector<ChatMessage> messages;            // all formats but text
  std::string instruction;                      // alpaca: kept apart for the Alpaca template
  std::string input;                            // alpaca: optional context
  std::string text;                             // text format only
  int64_t line = 0;                             // 1-based line where the record starts
  int64_t record = 0;  // 1-based place among the file's records, bad ones counted
  // The first message whose assistant turns train: 0, or the length of a conversational prompt
  // (TRL's {"prompt": [messages], "completion": [messages]}: only the completion trains).
  size_t first_trained_message = 0;
};

struct DatasetReaderOptions {
  DatasetFormat format = DatasetFormat::kAuto;
  bool skip_bad_lines = false;
  int64_t max_record_bytes = 16 << 20;  // a record larger than this is malformed
  // Non-empty: the file holds a request's inline records, one a line, and errors name them as
  // the request does ("dataset.inline_examples[2]", 0-based) rather than "<file>:3".
  std::string inline_name;
  // The path was resolved when the job was checked (no symlink in it): open it without following
  // any, so that a symlink put in its way since (to a file outside the dataset root) is refused
  // rather than read. Linux's openat2 RESOLVE_NO_SYMLINKS; where the kernel lacks it, a plain open.
  bool no_symlinks = false;
};

class DatasetReader {
 public:
  // Opens the file and decides between JSONL and a JSON array: a .jsonl file is always JSON
  // Lines (one bad first line starting with '[' must not turn it into an array), any other from
  // its first non-space byte. A compressed, UTF-16 or Parquet file is refused by name.
  static absl::StatusOr<std::unique_ptr<DatasetReader>> Open(const std::string& path,
                                                             DatasetReaderOptions options = {});

  // The next example; std::nullopt at the end of the file. A malformed record is an error unless
  // skip_bad_lines is set, in which case it is counted in skipped() and skipped over.
  absl::StatusOr<std::optional<Example>> Next();

  // How errors name the record that starts at `line`: "<file>:<line>" (in a JSON array with the
  // index of the record last begun, unless `name_record` is false: an error between records),
  // or the inline record.
  std::string Where(int64_t line, bool name_record = true) const;
  // How errors name the whole file: its path, or the inline records' name.
  const std::string& name() const;

  int64_t skipped() const { return skipped_; }
  // The first skipped record's error, for reports ("skipped 3 records; first: ..."), cut to a
  // few hundred bytes (it may quote the record).
  const std::string& first_skip_reason() const { return first_skip_reason_; }
  // Its place among the records (Example::record); 0 when none was skipped.
  int64_t first_skip_record() const { return first_skip_record_; }

  // Parses one JSON record (already isolated) into an Example; `where` prefixes errors.
  static absl::StatusOr<Example> ParseRecord(const std::string& json_text, DatasetFormat format,
                                             const std::string& where);

 private:
  DatasetReader() = default;
  // Reads the next raw record text and its starting line; false at the end.
  absl::StatusOr<bool> NextRecordText(std::string& text, int64_t& line);
  absl::StatusOr<bool> NextJsonlRecord(std::string& text, int64_t& line);
  bool ReadLineKeepingAtMost(int64_t keep, std::string& buffer);
  absl::StatusOr<bool> NextArrayElement(std::string& text, int64_t& line);

  std::string path_;
  DatasetReaderOptions options_;
  std::ifstream in_;
  bool array_ = false;               // a JSON array file rather than JSONL
  bool array_done_ = false;          // the closing bracket was read
  bool array_element_read_ = false;  // an element came before: a ',' must separate the next
  int64_t array_elements_ = 0;       // elements begun so far (Where names the last)
  int64_t line_ = 1;                 // current line of the read position
  int64_t skipped_ = 0;
  std::string first_skip_reason_;
  int64_t first_skip_record_ = 0;
  int64_t records_ = 0;         // record texts read so far, bad ones counted
  bool record_parsed_ = false;  // a record came before (good or bad)
};

// Reads a whole dataset into memory (small files, tests). An error when no record is usable.
absl::StatusOr<std::vector<Example>> ReadDataset(const std::string& path,
                                                 DatasetReaderOptions options = {},
                                                 int64_t* skipped = nullptr);

// What ReadDataset would return the size of (or its error), keeping one record at a time: the
// check when a job is submitted (a dataset of gigabytes must not be held in the daemon for it).
// CANCELLED soon after `*abandon` turns true (the daemon stopping).
absl::StatusOr<int64_t> CountDataset(const std::string& path, DatasetReaderOptions options = {},
                                     int64_t* skipped = nullptr,
                                     const std::atomic<bool>* abandon = nullptr);

}  // namespace lorad::engine
