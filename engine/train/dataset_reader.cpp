#include "engine/train/dataset_reader.h"

#include <fcntl.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "engine/model/json_file.h"
#include "engine/model/utf8.h"
#include "engine/runtime/durable_file.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

using nlohmann::json;

absl::Status Bad(const std::string& where, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(where, ": ", what));
}

// The string field `key`; an error names it when missing or not a string.
absl::StatusOr<std::string> StringField(const json& record, const char* key,
                                        const std::string& where, bool required = true) {
  auto it = record.find(key);
  if (it == record.end() || it->is_null()) {
    if (!required) return std::string();
    return Bad(where, absl::StrCat("field '", key, "' is ",
                                   it == record.end() ? "missing" : "null; it must be a string"));
  }
  if (!it->is_string()) return Bad(where, absl::StrCat("field '", key, "' must be a string"));
  return it->get<std::string>();
}

// Whether the record has `key` with a value: a null is a column the record lacks (what
// datasets' to_json and pandas write for a file made of differently shaped records), unless
// `nulls` (a record no format matches without them: its error then names the null field).
bool Has(const json& record, const char* key, bool nulls = false) {
  auto it = record.find(key);
  return it != record.end() && (nulls || !it->is_null());
}

// As TRL's SFTTrainer reads a record: messages, then prompt-completion, then a text field (a
// record Unsloth's notebooks mapped to "text" keeps its Alpaca columns beside it, and the text
// is what they train); Alpaca and question-answer pairs are lorad's.
DatasetFormat DetectFormat(const json& record, bool nulls = false) {
  const auto has = [&](const char* key) { return Has(record, key, nulls); };
  if (has("messages") || has("conversations")) return DatasetFormat::kChat;
  if (has("prompt") && has("completion")) return DatasetFormat::kCompletion;
  if (has("text")) return DatasetFormat::kText;
  if (has("instruction") && has("output")) return DatasetFormat::kAlpaca;
  if (has("question") && has("answer")) return DatasetFormat::kQa;
  if (!nulls) return DetectFormat(record, /*nulls=*/true);
  return DatasetFormat::kAuto;  // none matched
}

// The record's keys, for the error of a record no format matches ("instruction, outptu").
std::string KeysOf(const json& record) {
  std::vector<std::string> keys;
  for (auto it = record.begin(); it != record.end() && keys.size() < 12; ++it) {
    keys.push_back(Utf8Shortened(it.key(), 40));
  }
  if (keys.empty()) return "it has none";
  return absl::StrCat("its keys: ", absl::StrJoin(keys, ", "),
                      record.size() > keys.size() ? ", ..." : "");
}

// Whether a tools / tool_calls value holds something: exports fill a column a record lacks with
// null, "" or false (pandas' fillna(""), CSV conversions), or write an empty list as "[]".
bool HoldsTools(const json& value) {
  if (value.is_array() || value.is_object()) return !value.empty();
  if (value.is_string()) {
    const std::string& s = value.get_ref<const std::string&>();
    return !s.empty() && s != "[]";
  }
  if (value.is_boolean()) return value.get<bool>();
  return !value.is_null();
}

// Tool calls and tool schemas: lorad renders a turn's role and content only, so a turn that
// calls a tool would train as an empty (or cut) reply and the schemas would never reach the
// prompt. Refused, naming the field, rather than trained wrong.
absl::Status RefuseTools(const json& record, const std::string& where) {
  for (const char* key : {"tools", "functions"}) {
    auto it = record.find(key);
    if (it != record.end() && HoldsTools(*it)) {
      return Bad(where, absl::StrCat("field '", key,
                                     "': tool schemas are not supported (lorad's chat templates "
                                     "render each turn's role and content only); leave such "
                                     "records out, or set dataset.skip_bad_lines"));
    }
  }
  return absl::OkStatus();
}

// How a conversation's turns are spelled: {role, content} with system/user/assistant, or
// ShareGPT's {from, value} with system/human/gpt (many Hugging Face datasets; Unsloth's notebooks
// convert them with standardize_sharegpt).
struct TurnKeys {
  const char* role;
  const char* content;
  const char* user;
  const char* assistant;
};
constexpr TurnKeys kOpenAiTurns = {"role", "content", "user", "assistant"};
constexpr TurnKeys kShareGptTurns = {"from", "value", "human", "gpt"};

// The list of turns in record[key], appended to ex.messages (as system/user/assistant); an error
// unless it has an assistant message when `needs_assistant`.
absl::Status ParseMessages(const json& record, const char* key, bool needs_assistant,
                           const std::string& where, Example& ex,
                           const TurnKeys& turns = kOpenAiTurns) {
  const json& messages = record[key];
  if (!messages.is_array() || messages.empty()) {
    return Bad(where, absl::StrCat("field '", key, "' must be a non-empty list of {", turns.role,
                                   ", ", turns.content, "}"));
  }
  bool has_assistant = false;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string field = absl::StrCat(key, "[", i, "]");
    if (!messages[i].is_object())
      return Bad(where, absl::StrCat("field '", field, "' must be an object"));
    auto role = StringField(messages[i], turns.role, absl::StrCat(where, ": ", field));
    if (!role.ok()) return role.status();
    if (*role == turns.user) {
      *role = "user";
    } else if (*role == turns.assistant) {
      *role = "assistant";
    } else if (*role != "system") {
      return Bad(where, absl::StrCat("field '", field, ".", turns.role, "' is '", *role,
                                     "'; expected system, ", turns.user, " or ", turns.assistant));
    }
    for (const char* calls : {"tool_calls", "function_call"}) {
      auto it = messages[i].find(calls);
      if (it != messages[i].end() && HoldsTools(*it)) {
        return Bad(where, absl::StrCat("field '", field, ".", calls,
                                       "': tool calls are not supported (lorad's chat templates "
                                       "render each turn's role and content only, so the turn "
                                       "would train as a reply without its call); leave such "
                                       "records out, or set dataset.skip_bad_lines"));
      }
    }
    auto content = StringField(messages[i], turns.content, absl::StrCat(where, ": ", field));
    if (!content.ok()) return content.status();
    has_assistant |= *role == "assistant";
    ex.messages.push_back({*role, *content});
  }
  if (needs_assistant && !has_assistant) {
    return Bad(where, absl::StrCat("field '", key,
                                   "' has no assistant message: there is nothing to learn"));
  }
  return absl::OkStatus();
}

// A prompt/response pair as a two-turn conversation.
absl::Status ParsePair(const json& record, const std::string& where, const char* prompt_key,
                       const char* response_key, Example& ex) {
  auto prompt = StringField(record, prompt_key, where);
  if (!prompt.ok()) return prompt.status();
  auto response = StringField(record, response_key, where);
  if (!response.ok()) return response.status();
  ex.messages = {{"user", *prompt}, {"assistant", *response}};
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DatasetFormat> DatasetFormatFromName(const std::string& name) {
  for (DatasetFormat f : {DatasetFormat::kAuto, DatasetFormat::kAlpaca, DatasetFormat::kChat,
                          DatasetFormat::kCompletion, DatasetFormat::kText, DatasetFormat::kQa}) {
    if (name == DatasetFormatName(f)) return f;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "dataset format '", name, "' is unknown (known: auto, alpaca, chat, completion, text, qa)"));
}

const char* DatasetFormatName(DatasetFormat format) {
  switch (format) {
    case DatasetFormat::kAuto:
      return "auto";
    case DatasetFormat::kAlpaca:
      return "alpaca";
    case DatasetFormat::kChat:
      return "chat";
    case DatasetFormat::kCompletion:
      return "completion";
    case DatasetFormat::kText:
      return "text";
    case DatasetFormat::kQa:
      return "qa";
  }
  return "unknown";
}

absl::StatusOr<Example> DatasetReader::ParseRecord(const std::string& json_text,
                                                   DatasetFormat format, const std::string& where) {
  json record;
  // The parser takes a NUL as the end of its input: what follows it would go unread.
  if (const size_t nul = json_text.find('\0'); nul != std::string::npos) {
    return Bad(where, absl::StrCat("not valid JSON (a NUL byte at column ", nul + 1, ")"));
  }
  if (auto s = CheckJsonNesting(json_text, where); !s.ok()) return s;
  try {
    try {
      record = json::parse(json_text);
    } catch (const json::exception&) {
      // What Python's json reads beyond JSON (NaN in a record's metadata, as json.dumps writes a
      // float NaN; a lone surrogate escape): read as Python does, else the first error stands.
      const std::string extended = WithPythonJsonExtensions(json_text);
      if (extended == json_text) throw;
      record = json::parse(extended, nullptr, /*allow_exceptions=*/false);
      if (record.is_discarded()) throw;
    }
  } catch (const json::exception& e) {
    // "[json.exception.parse_error.101] parse error at line 1, column 9: syntax error ...", or
    // out_of_range.406 for a number past a double's range (1e400): the reason, without the
    // library's code.
    std::string_view reason = e.what();
    if (const size_t at = reason.find("] "); at != std::string_view::npos) {
      reason.remove_prefix(at + 2);
    }
    // The parser quotes what it read last, which may be a whole megabyte-long string.
    return Bad(where,
               absl::StrCat("not valid JSON (", Utf8Shortened(reason, kMaxSkipReasonBytes), ")"));
  }
  if (!record.is_object()) return Bad(where, "expected a JSON object");
  Example ex;
  ex.format = format == DatasetFormat::kAuto ? DetectFormat(record) : format;
  absl::Status status;
  switch (ex.format) {
    case DatasetFormat::kAuto:
      return Bad(where, absl::StrCat("record matches no known format: expected keys messages | "
                                     "conversations | prompt+completion | text | "
                                     "instruction+output | question+answer (",
                                     KeysOf(record), ")"));
    case DatasetFormat::kChat:
      if (auto s = RefuseTools(record, where); !s.ok()) return s;
      if (Has(record, "messages")) {
        status = ParseMessages(record, "messages", /*needs_assistant=*/true, where, ex);
      } else if (Has(record, "conversations")) {
        // ShareGPT's {from, value} turns, or {role, content} ones under the same key (what
        // Unsloth's standardize_sharegpt writes): by the first turn's keys.
        const json& turns = record["conversations"];
        const bool role_content = turns.is_array() && !turns.empty() && turns[0].is_object() &&
                                  turns[0].contains("role") && !turns[0].contains("from");
        status = ParseMessages(record, "conversations", /*needs_assistant=*/true, where, ex,
                               role_content ? kOpenAiTurns : kShareGptTurns);
      } else {
        return Bad(where, "field 'messages' (or ShareGPT's 'conversations') is missing or null");
      }
      break;
    case DatasetFormat::kAlpaca: {
      auto instruction = StringField(record, "instruction", where);
      if (!instruction.ok()) return instruction.status();
      auto input = StringField(record, "input", where, /*required=*/false);
      if (!input.ok()) return input.status();
      auto output = StringField(record, "output", where);
      if (!output.ok()) return output.status();
      ex.instruction = *instruction;
      ex.input = *input;
      const std::string prompt =
          ex.input.empty() ? ex.instruction : ex.instruction + "\n\n" + ex.input;
      ex.messages = {{"user", prompt}, {"assistant", *output}};
      break;
    }
    case DatasetFormat::kCompletion:
      if (record.contains("prompt") && record["prompt"].is_array()) {
        // TRL's conversational prompt-completion: message lists; the completion's train.
        if (auto s = RefuseTools(record, where); !s.ok()) return s;
        status = ParseMessages(record, "prompt", /*needs_assistant=*/false, where, ex);
        ex.first_trained_message = ex.messages.size();
        if (status.ok() && !record.contains("completion")) {
          status = Bad(where, "field 'completion' is missing");
        }
        if (status.ok()) {
          status = ParseMessages(record, "completion", /*needs_assistant=*/true, where, ex);
        }
      } else {
        status = ParsePair(record, where, "prompt", "completion", ex);
      }
      break;
    case DatasetFormat::kQa:
      status = ParsePair(record, where, "question", "answer", ex);
      break;
    case DatasetFormat::kText: {
      auto text = StringField(record, "text", where);
      if (!text.ok()) return text.status();
      if (text->empty()) return Bad(where, "field 'text' is empty");
      ex.text = *text;
      break;
    }
  }
  if (!status.ok()) return status;
  return ex;
}

namespace {

// Opens `path` into `in`, refusing any symlink on the way when `no_symlinks` (openat2
// RESOLVE_NO_SYMLINKS), then reads through /proc/self/fd: the file opened is the one checked,
// whatever the path becomes. O_NONBLOCK and the check that it is a regular file: a named pipe put
// in the dataset's place would otherwise hold the open (and the job, and a shutdown) for ever.
absl::Status OpenDataset(const std::string& path, bool no_symlinks, std::ifstream& in) {
  int fd = -1;
  if (no_symlinks) {
    fd = OpenWithoutSymlinks(path);
    if (fd < 0 && (errno == ELOOP || errno == EXDEV)) {
      return absl::PermissionDeniedError(
          absl::StrCat("dataset '", path,
                       "' now leads through a symlink: it changed since its path was "
                       "checked; submit the job again"));
    }
    if (fd < 0 && (errno == ENOSYS || errno == EPERM)) {  // an old kernel, or a seccomp filter
      static std::once_flag warned;
      std::call_once(warned, [] {  // the engine does not use spdlog (torch's fmt)
        std::fprintf(stderr,
                     "lorad: openat2 is not available (an old kernel or a container's seccomp "
                     "profile): job datasets are opened following symlinks, so one put in a "
                     "dataset's path after its job was checked would be followed\n");
      });
      no_symlinks = false;
    }
  }
  const std::string what = absl::StrCat("dataset '", path, "'");
  if (!no_symlinks) {
    auto opened = OpenRegularFile(path, what);
    if (!opened.ok()) return opened.status();
    fd = *opened;
  } else if (fd < 0) {
    return absl::NotFoundError(absl::StrCat(what, " cannot be read: ", std::strerror(errno)));
  } else if (auto s = RequireRegularDescriptor(fd, what); !s.ok()) {
    close(fd);
    return s;
  }
  in.open(absl::StrCat("/proc/self/fd/", fd), std::ios::binary);
  close(fd);  // the stream holds its own descriptor of the same file
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<DatasetReader>> DatasetReader::Open(const std::string& path,
                                                                   DatasetReaderOptions options) {
  std::unique_ptr<DatasetReader> reader(new DatasetReader());
  reader->path_ = path;
  reader->options_ = options;
  if (auto s = RequireRegularFile(path, absl::StrCat("dataset '", path, "'")); !s.ok()) return s;
  if (auto opened = OpenDataset(path, options.no_symlinks, reader->in_); !opened.ok()) {
    return opened;
  }
  if (!reader->in_) {
    return absl::NotFoundError(absl::StrCat("dataset '", path, "' cannot be read"));
  }
  // Files that are not UTF-8 JSON, by their first bytes: say what they are rather than show
  // a parse error full of binary.
  char head[4] = {};
  reader->in_.read(head, 4);
  const absl::string_view magic(head, static_cast<size_t>(reader->in_.gcount()));
  reader->in_.clear();
  reader->in_.seekg(0);
  for (const auto& [prefix, what] :
       std::initializer_list<std::pair<absl::string_view, const char*>>{
           {"\x1F\x8B", "gzip-compressed: decompress it (gunzip) first"},
           {"PK\x03\x04", "a zip archive: extract the JSON/JSONL file from it"},
           {"(\xB5/\xFD", "zstd-compressed: decompress it (unzstd) first"},
           {"BZh", "bzip2-compressed: decompress it (bunzip2) first"},
           {"PAR1",
            "a Parquet file: convert it to JSONL first (e.g. pandas.read_parquet(...)"
            ".to_json(path, orient='records', lines=True))"},
           {"\xFF\xFE", "UTF-16 text: save it as UTF-8"},
           {"\xFE\xFF", "UTF-16 text: save it as UTF-8"}}) {
    if (absl::StartsWith(magic, prefix)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "dataset '", path, "' is ", what, " (lorad reads UTF-8 JSON Lines or a JSON array)"));
    }
  }
  // Comma- or tab-separated values, by name: a parse error of their header line says nothing.
  for (const char* table : {".csv", ".tsv"}) {
    if (absl::EndsWithIgnoreCase(path, table)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "dataset '", path, "' is ", table + 1,
          " text: lorad reads UTF-8 JSON Lines or a JSON array; convert it first (e.g. "
          "pandas.read_csv(path",
          table[1] == 't' ? ", sep='\\t'" : "", ").to_json(out, orient='records', lines=True))"));
    }
  }
  // A UTF-8 byte order mark (as some Windows editors write) is not part of the JSON.
  if (absl::StartsWith(magic, "\xEF\xBB\xBF")) reader->in_.seekg(3);
  if (absl::EndsWith(path, ".jsonl")) return reader;  // JSON Lines by name
  // Skip leading white space to see whether this is a JSON array.
  int c;
  while ((c = reader->in_.peek()) != EOF && std::isspace(c)) {
    if (reader->in_.get() == '\n') ++reader->line_;
  }
  if (c == '[') {
    reader->in_.get();
    reader->array_ = true;
  }
  return reader;
}

absl::StatusOr<bool> DatasetReader::NextJsonlRecord(std::string& text, int64_t& line) {
  std::string buffer;
  while (ReadLineKeepingAtMost(options_.max_record_bytes + 1, buffer)) {
    line = line_++;
    if (!buffer.empty() && buffer.back() == '\r') buffer.pop_back();
    bool blank = true;
    for (char ch : buffer) blank &= std::isspace(static_cast<unsigned char>(ch)) != 0;
    if (blank) continue;
    text = std::move(buffer);
    return true;
  }
  return false;
}

// One line (without its '\n') into `buffer`, keeping at most `keep` bytes of it: the rest of an
// overlong line is read past, not held (a 600 MB line held 1 GB only to be refused as too large).
// False at the end of the file.
bool DatasetReader::ReadLineKeepingAtMost(int64_t keep, std::string& buffer) {
  buffer.clear();
  std::streambuf* bytes = in_.rdbuf();
  bool any = false;
  while (true) {
    const int c = bytes->sbumpc();
    if (c == std::char_traits<char>::eof()) return any;
    any = true;
    if (c == '\n') return true;
    if (static_cast<int64_t>(buffer.size()) < keep) buffer.push_back(static_cast<char>(c));
  }
}

// A JSON array read one element at a time, as strictly as Python's json reads the whole file:
// elements separated by single commas, no comma before ']', nothing but white space after it.
absl::StatusOr<bool> DatasetReader::NextArrayElement(std::string& text, int64_t& line) {
  if (array_done_) return false;
  text.clear();
  const auto here = [this] { return Where(line_, /*name_record=*/false); };
  bool after_comma = false;
  int c;
  while (true) {  // white space and the separator before the next element
    c = in_.get();
    if (c == EOF) return Bad(here(), "the JSON array is not closed with ']'");
    if (c == '\n') ++line_;
    if (std::isspace(c)) continue;
    if (c == ']') {
      if (after_comma) return Bad(here(), "a ',' right before ']' (JSON allows no trailing comma)");
      array_done_ = true;
      while ((c = in_.get()) != EOF) {
        if (c == '\n') ++line_;
        if (!std::isspace(c)) return Bad(here(), "text after the JSON array's closing ']'");
      }
      return false;
    }
    if (c == ',') {
      if (!array_element_read_ || after_comma) return Bad(here(), "a ',' where a record belongs");
      after_comma = true;
      continue;
    }
    if (array_element_read_ && !after_comma) {
      return Bad(here(), "expected ',' or ']' after the previous record");
    }
    break;
  }
  array_element_read_ = true;
  ++array_elements_;
  line = line_;
  int depth = 0;
  JsonStringState strings;
  for (;; c = in_.get()) {
    if (c == EOF) return Bad(Where(line), "the file ends inside a record");
    if (c == '\n') ++line_;
    text.push_back(static_cast<char>(c));
    if (static_cast<int64_t>(text.size()) > options_.max_record_bytes) {
      return Bad(Where(line),
                 absl::StrCat("record is larger than ", options_.max_record_bytes, " bytes"));
    }
    if (strings.Feed(c)) {
      // A bare string, ended: not a record, which the parse then says.
      if (!strings.in_string() && depth == 0) return true;
      continue;
    }
    if (c == '{' || c == '[') {
      ++depth;
    } else if (c == '}' || c == ']') {
      if (--depth <= 0) return true;
    } else if (depth == 0) {  // a bare number or literal ends before a separator
      const int next = in_.peek();
      if (next == EOF || next == ',' || next == ']' || std::isspace(next)) return true;
    }
  }
}

std::string DatasetReader::Where(int64_t line, bool name_record) const {
  if (!options_.inline_name.empty()) return absl::StrCat(options_.inline_name, "[", line - 1, "]");
  // A JSON array is often written on one line (json.dump, pandas' to_json): the line alone
  // would name every record alike.
  if (array_ && array_elements_ > 0 && name_record) {
    return absl::StrCat(path_, ":", line, " (record [", array_elements_ - 1, "] of the array)");
  }
  return absl::StrCat(path_, ":", line);
}

const std::string& DatasetReader::name() const {
  return options_.inline_name.empty() ? path_ : options_.inline_name;
}

absl::StatusOr<bool> DatasetReader::NextRecordText(std::string& text, int64_t& line) {
  return array_ ? NextArrayElement(text, line) : NextJsonlRecord(text, line);
}

absl::StatusOr<std::optional<Example>> DatasetReader::Next() {
  std::string text;
  int64_t line = 0;
  while (true) {
    auto more = NextRecordText(text, line);
    if (!more.ok()) return more.status();  // the file's structure is broken: nothing to skip to
    if (!*more) return std::optional<Example>();
    ++records_;
    const std::string where = Where(line);
    // A JSONL line is read whole; one over the limit is a bad record like any other (an array
    // element stops the read at the limit, see NextArrayElement).
    auto example =
        static_cast<int64_t>(text.size()) > options_.max_record_bytes
            ? absl::StatusOr<Example>(Bad(where, absl::StrCat("record is larger than ",
                                                              options_.max_record_bytes, " bytes")))
            : ParseRecord(text, options_.format, where);
    if (example.ok()) {
      example->line = line;
      example->record = records_;
      record_parsed_ = true;
      return std::optional<Example>(std::move(*example));
    }
    // A pretty-printed object fails on its first line ("{"), which ends before the object does,
    // and a JSON array in a .jsonl file on its first ("["): say what the file must be instead
    // (not for a first line that is wrong in another way).
    const absl::string_view first = absl::StripLeadingAsciiWhitespace(text);
    const absl::string_view message = example.status().message();
    const bool cut_object = absl::StrContains(message, "not valid JSON") &&
                            absl::StrContains(message, "unexpected end of input") &&
                            absl::StartsWith(first, "{");
    if (!array_ && !record_parsed_ && (cut_object || absl::StartsWith(first, "["))) {
      // A line holding a bare list of turns is a conversation without its key.
      const bool turns = !cut_object && absl::StrContains(first, "\"role\"");
      example = Bad(where,
                    absl::StrCat(absl::StripPrefix(message, absl::StrCat(where, ": ")),
                                 cut_object ? "; JSON Lines hold one whole record per line (a "
                                              "pretty-printed file must be a JSON array of records)"
                                 : turns    ? "; a line holding a list of messages is a "
                                              "conversation without its key: write each line "
                                              "as {\"messages\": [...]}"
                                            : "; a .jsonl file is read line by line, one "
                                              "record a line: name a file holding a JSON "
                                              "array .json"));
    }
    record_parsed_ = true;
    if (!options_.skip_bad_lines) return example.status();
    if (skipped_++ == 0) {
      first_skip_reason_ =
          Utf8Shortened(std::string(example.status().message()), kMaxSkipReasonBytes);
      first_skip_record_ = records_;
    }
  }
}

namespace {

// Hands every usable record of `path` to `take`; returns how many, or the error ReadDataset
// documents (none usable: why the first was skipped).
absl::StatusOr<int64_t> ForEachRecord(const std::string& path, const DatasetReaderOptions& options,
                                      int64_t* skipped, const std::function<void(Example&&)>& take,
                                      const std::atomic<bool>* abandon = nullptr) {
  auto reader = DatasetReader::Open(path, options);
  if (!reader.ok()) return reader.status();
  int64_t count = 0;
  while (true) {
    if (abandon != nullptr && abandon->load()) {
      return absl::CancelledError(absl::StrCat("reading dataset '", path, "' was abandoned"));
    }
    auto next = (*reader)->Next();
    if (!next.ok()) return next.status();
    if (!next->has_value()) break;
    take(std::move(**next));
    ++count;
  }
  if (skipped != nullptr) *skipped = (*reader)->skipped();
  if (count == 0) {
    const std::string& why = (*reader)->first_skip_reason();
    return absl::InvalidArgumentError(
        absl::StrCat("dataset '", path, "' has no usable records",
                     why.empty() ? std::string()
                                 : absl::StrCat(" (", (*reader)->skipped(),
                                                " bad records skipped; the first: ", why, ")")));
  }
  return count;
}

}  // namespace

absl::StatusOr<std::vector<Example>> ReadDataset(const std::string& path,
                                                 DatasetReaderOptions options, int64_t* skipped) {
  std::vector<Example> examples;
  auto count =
      ForEachRecord(path, options, skipped, [&](Example&& e) { examples.push_back(std::move(e)); });
  if (!count.ok()) return count.status();
  return examples;
}

absl::StatusOr<int64_t> CountDataset(const std::string& path, DatasetReaderOptions options,
                                     int64_t* skipped, const std::atomic<bool>* abandon) {
  return ForEachRecord(
      path, options, skipped, [](Example&&) {}, abandon);
}

}  // namespace lorad::engine
