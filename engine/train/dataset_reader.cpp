#include "engine/train/dataset_reader.h"

#include <cctype>

#include "absl/strings/str_cat.h"
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
    return Bad(where, absl::StrCat("field '", key, "' is missing"));
  }
  if (!it->is_string()) return Bad(where, absl::StrCat("field '", key, "' must be a string"));
  return it->get<std::string>();
}

DatasetFormat DetectFormat(const json& record) {
  if (record.contains("messages")) return DatasetFormat::kChat;
  if (record.contains("instruction") && record.contains("output")) return DatasetFormat::kAlpaca;
  if (record.contains("prompt") && record.contains("completion")) return DatasetFormat::kCompletion;
  if (record.contains("question") && record.contains("answer")) return DatasetFormat::kQa;
  if (record.contains("text")) return DatasetFormat::kText;
  return DatasetFormat::kAuto;  // none matched
}

absl::Status ParseChat(const json& record, const std::string& where, Example& ex) {
  const json& messages = record["messages"];
  if (!messages.is_array() || messages.empty()) {
    return Bad(where, "field 'messages' must be a non-empty list of {role, content}");
  }
  bool has_assistant = false;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string field = absl::StrCat("messages[", i, "]");
    if (!messages[i].is_object())
      return Bad(where, absl::StrCat("field '", field, "' must be an object"));
    auto role = StringField(messages[i], "role", absl::StrCat(where, ": ", field));
    if (!role.ok()) return role.status();
    if (*role != "system" && *role != "user" && *role != "assistant") {
      return Bad(where, absl::StrCat("field '", field, ".role' is '", *role,
                                     "'; expected system, user or assistant"));
    }
    auto content = StringField(messages[i], "content", absl::StrCat(where, ": ", field));
    if (!content.ok()) return content.status();
    has_assistant |= *role == "assistant";
    ex.messages.push_back({*role, *content});
  }
  if (!has_assistant) {
    return Bad(where, "field 'messages' has no assistant message: there is nothing to learn");
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
  json record = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (record.is_discarded()) return Bad(where, "not valid JSON");
  if (!record.is_object()) return Bad(where, "expected a JSON object");
  Example ex;
  ex.format = format == DatasetFormat::kAuto ? DetectFormat(record) : format;
  absl::Status status;
  switch (ex.format) {
    case DatasetFormat::kAuto:
      return Bad(where,
                 "record matches no known format: expected keys messages | instruction+"
                 "output | prompt+completion | question+answer | text");
    case DatasetFormat::kChat:
      if (!record.contains("messages")) return Bad(where, "field 'messages' is missing");
      status = ParseChat(record, where, ex);
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
      status = ParsePair(record, where, "prompt", "completion", ex);
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

absl::StatusOr<std::unique_ptr<DatasetReader>> DatasetReader::Open(const std::string& path,
                                                                   DatasetReaderOptions options) {
  std::unique_ptr<DatasetReader> reader(new DatasetReader());
  reader->path_ = path;
  reader->options_ = options;
  if (auto s = RequireRegularFile(path, absl::StrCat("dataset '", path, "'")); !s.ok()) return s;
  reader->in_.open(path, std::ios::binary);
  if (!reader->in_) {
    return absl::NotFoundError(absl::StrCat("dataset '", path, "' cannot be read"));
  }
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
  while (std::getline(in_, buffer)) {
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

absl::StatusOr<bool> DatasetReader::NextArrayElement(std::string& text, int64_t& line) {
  if (array_done_) return false;
  text.clear();
  int depth = 0;
  bool in_string = false, escaped = false, started = false;
  int c;
  while ((c = in_.get()) != EOF) {
    if (c == '\n') ++line_;
    if (!started) {
      if (std::isspace(c) || c == ',') continue;
      if (c == ']') {
        array_done_ = true;
        return false;
      }
      started = true;
      line = line_;
    }
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      ++depth;
    } else if (c == '}' || c == ']') {
      if (depth == 0) {  // the array's closing bracket right after a scalar element
        array_done_ = true;
        return true;
      }
      --depth;
    } else if (c == ',' && depth == 0) {
      return true;
    }
    text.push_back(static_cast<char>(c));
    if (static_cast<int64_t>(text.size()) > options_.max_record_bytes) {
      return Bad(absl::StrCat(path_, ":", line),
                 absl::StrCat("record is larger than ", options_.max_record_bytes, " bytes"));
    }
    if (depth == 0 && !in_string && (c == '}' || c == ']')) return true;
  }
  if (started) return Bad(absl::StrCat(path_, ":", line), "the file ends inside a record");
  return Bad(absl::StrCat(path_, ":", line_), "the JSON array is not closed with ']'");
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
    auto example = ParseRecord(text, options_.format, absl::StrCat(path_, ":", line));
    if (example.ok()) {
      example->line = line;
      return std::optional<Example>(std::move(*example));
    }
    if (!options_.skip_bad_lines) return example.status();
    if (skipped_++ == 0) first_skip_reason_ = std::string(example.status().message());
  }
}

absl::StatusOr<std::vector<Example>> ReadDataset(const std::string& path,
                                                 DatasetReaderOptions options, int64_t* skipped) {
  auto reader = DatasetReader::Open(path, options);
  if (!reader.ok()) return reader.status();
  std::vector<Example> examples;
  while (true) {
    auto next = (*reader)->Next();
    if (!next.ok()) return next.status();
    if (!next->has_value()) break;
    examples.push_back(std::move(**next));
  }
  if (skipped != nullptr) *skipped = (*reader)->skipped();
  if (examples.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("dataset '", path, "' has no usable records"));
  }
  return examples;
}

}  // namespace lorad::engine
