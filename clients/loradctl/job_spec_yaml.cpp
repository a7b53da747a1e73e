#include "clients/loradctl/job_spec_yaml.h"

#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "clients/loradctl/enum_names.h"

namespace lorad::cli {

namespace {

// An inline example's record at most (the daemon's default server.max_request_bytes), and all of
// a file's records together: what YAML aliases may expand to (ToJson's count, about the memory
// taken).
constexpr int64_t kMaxInlineExampleBytes = int64_t{4} << 20;
constexpr int64_t kMaxInlineExamplesBytes = int64_t{256} << 20;

// The shortest text that reads back as the same value (2e-4 stays "0.0002", 1.23456789e-4 keeps
// every digit): a spec printed by `train show --spec` and submitted again is the same job.
template <typename T>
std::string ShortestText(T value) {
  char buffer[64];
  const auto [end, error] = std::to_chars(buffer, buffer + sizeof(buffer), value);
  return error == std::errc() ? std::string(buffer, end) : std::to_string(value);
}

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

// Names users reach for that differ from the proto's field names: {message, alias, field}.
struct FieldAlias {
  const char* message;
  const char* alias;
  const char* field;
};
constexpr FieldAlias kAliases[] = {{"lorad.v1.LoraSpec", "rslora", "use_rslora"}};

constexpr const char* kInlineExample = "lorad.v1.InlineExample";

// Fields SubmitJob fills in itself (from init_adapter): a job file naming them would be
// accepted and then trained from something else than it says.
bool FilledBySubmit(const Descriptor* type, const std::string& key) {
  return type->full_name() == "lorad.v1.JobSpec" &&
         (key == "init_adapter_path" || key == "init_adapter_version" ||
          key == "init_adapter_fingerprint");
}

const FieldDescriptor* FindField(const Descriptor* type, const std::string& key) {
  if (FilledBySubmit(type, key)) return nullptr;
  if (const FieldDescriptor* field = type->FindFieldByName(key)) return field;
  for (const auto& alias : kAliases) {
    if (type->full_name() == alias.message && key == alias.alias) {
      return type->FindFieldByName(alias.field);
    }
  }
  return nullptr;
}

std::string KnownKeys(const Descriptor* type) {
  std::vector<std::string> keys;
  for (int i = 0; i < type->field_count(); ++i) {
    if (!FilledBySubmit(type, type->field(i)->name())) keys.push_back(type->field(i)->name());
  }
  return absl::StrJoin(keys, ", ");
}

class YamlToProto {
 public:
  explicit YamlToProto(std::string source) : source_(std::move(source)) {}

  // `path` is the dotted key of `node` ("training"), empty at the top level.
  absl::Status FillMessage(const YAML::Node& node, const std::string& path, Message* message) {
    if (node.IsNull()) return absl::OkStatus();  // `lora:` with nothing under it
    if (!node.IsMap()) {
      return Error(node, absl::StrCat(Describe(path), " must be a mapping of keys to values"));
    }
    const Descriptor* type = message->GetDescriptor();
    std::set<const FieldDescriptor*> seen;
    for (const auto& entry : node) {
      const YAML::Node& key_node = entry.first;
      const std::string key = key_node.Scalar();
      const std::string key_path = path.empty() ? key : absl::StrCat(path, ".", key);
      const FieldDescriptor* field = FindField(type, key);
      if (field == nullptr && FilledBySubmit(type, key)) {
        return Error(key_node, absl::StrCat("'", key,
                                            "' is filled in by lorad when the job is submitted "
                                            "(the version init_adapter serves then); name the "
                                            "adapter to continue with init_adapter alone"));
      }
      if (field == nullptr) {
        return Error(key_node, absl::StrCat("unknown key '", key, "' in ", Describe(path),
                                            " (known keys: ", KnownKeys(type), ")"));
      }
      if (!seen.insert(field).second) {
        return Error(key_node, absl::StrCat("duplicate key '", key_path, "'"));
      }
      absl::Status status = field->is_repeated()
                                ? FillRepeated(entry.second, key_path, field, message)
                                : FillSingular(entry.second, key_path, field, message);
      if (!status.ok()) return status;
    }
    return absl::OkStatus();
  }

 private:
  absl::Status FillRepeated(const YAML::Node& node, const std::string& path,
                            const FieldDescriptor* field, Message* message) {
    if (node.IsNull()) return absl::OkStatus();
    if (!node.IsSequence()) return Error(node, absl::StrCat("'", path, "' must be a list"));
    for (std::size_t i = 0; i < node.size(); ++i) {
      const std::string item_path = absl::StrCat(path, "[", i, "]");
      if (field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
        Message* item = message->GetReflection()->AddMessage(message, field);
        if (auto status = FillNestedMessage(node[i], item_path, item); !status.ok()) return status;
        continue;
      }
      if (auto status = AddScalar(node[i], item_path, field, message); !status.ok()) return status;
    }
    return absl::OkStatus();
  }

  absl::Status FillSingular(const YAML::Node& node, const std::string& path,
                            const FieldDescriptor* field, Message* message) {
    // `seed:` with no value keeps the default, as a key with no value does in lorad.yaml.
    if (node.IsNull()) return absl::OkStatus();
    if (field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      return FillNestedMessage(node, path,
                               message->GetReflection()->MutableMessage(message, field));
    }
    return AddScalar(node, path, field, message);
  }

  // InlineExample holds one dataset record as JSON text; in YAML the record is written as a
  // mapping (or as the JSON string itself).
  absl::Status FillNestedMessage(const YAML::Node& node, const std::string& path,
                                 Message* message) {
    if (message->GetDescriptor()->full_name() == kInlineExample &&
        (node.IsScalar() || node.IsMap())) {
      const FieldDescriptor* json = message->GetDescriptor()->FindFieldByName("json");
      // Aliases repeat what they name: a few hundred bytes of nested aliases ("billion laughs")
      // expand to gigabytes, in one record or in thousands of records naming one. Refused
      // before: a record larger than a request could be, or records past 256 MiB in all.
      const int64_t allowed = std::min(kMaxInlineExampleBytes, inline_bytes_left_);
      int64_t budget = allowed;
      nlohmann::json record;
      if (node.IsScalar()) {
        budget -= static_cast<int64_t>(node.Scalar().size());
      } else {
        record = ToJson(node, &budget);
      }
      if (budget < 0) {
        const bool one = allowed == kMaxInlineExampleBytes;
        return Error(node,
                     absl::StrCat(one ? absl::StrCat("'", path, "' expands") : "the records expand",
                                  " to more than ",
                                  (one ? kMaxInlineExampleBytes : kMaxInlineExamplesBytes) >> 20,
                                  one ? " MiB" : " MiB in all",
                                  " (YAML aliases repeat what they name); write the "
                                  "records out, or put the examples in a dataset file"));
      }
      inline_bytes_left_ -= allowed - budget;
      std::string text = node.IsScalar() ? node.Scalar() : record.dump();
      message->GetReflection()->SetString(message, json, text);
      return absl::OkStatus();
    }
    return FillMessage(node, path, message);
  }

  // Sets (or, for repeated fields, appends) one scalar value, checked against the field's type.
  absl::Status AddScalar(const YAML::Node& node, const std::string& path,
                         const FieldDescriptor* field, Message* message) {
    if (!node.IsScalar()) {
      return Error(node, absl::StrCat("'", path, "' must be a single value, not a ",
                                      node.IsNull() ? "missing value" : "list or mapping"));
    }
    const std::string text = node.Scalar();
    const Reflection* r = message->GetReflection();
    const bool rep = field->is_repeated();
    auto bad = [&](const std::string& expected) {
      // A whole number too large for the field is out of range, not "not an integer".
      const bool digits = !text.empty() &&
                          text.find_first_not_of("+-0123456789") == std::string::npos &&
                          text.find_first_of("0123456789") != std::string::npos;
      const std::string what =
          digits && absl::StrContains(expected, "integer")
              ? absl::StrCat(expected, " the field can hold (", field->cpp_type_name(), ")")
              : expected;
      return Error(node, absl::StrCat("'", path, "' must be ", what, ", got '", text, "'"));
    };
    switch (field->cpp_type()) {
      case FieldDescriptor::CPPTYPE_INT32: {
        int32_t v;
        if (!absl::SimpleAtoi(text, &v)) return bad("an integer");
        rep ? r->AddInt32(message, field, v) : r->SetInt32(message, field, v);
        break;
      }
      case FieldDescriptor::CPPTYPE_INT64: {
        int64_t v;
        if (!absl::SimpleAtoi(text, &v)) return bad("an integer");
        rep ? r->AddInt64(message, field, v) : r->SetInt64(message, field, v);
        break;
      }
      case FieldDescriptor::CPPTYPE_UINT32: {
        uint32_t v;
        if (!absl::SimpleAtoi(text, &v)) return bad("a non-negative integer");
        rep ? r->AddUInt32(message, field, v) : r->SetUInt32(message, field, v);
        break;
      }
      case FieldDescriptor::CPPTYPE_UINT64: {
        uint64_t v;
        if (!absl::SimpleAtoi(text, &v)) return bad("a non-negative integer");
        rep ? r->AddUInt64(message, field, v) : r->SetUInt64(message, field, v);
        break;
      }
      case FieldDescriptor::CPPTYPE_DOUBLE:
      case FieldDescriptor::CPPTYPE_FLOAT: {
        double v;
        if (!absl::SimpleAtod(text, &v)) return bad("a number");
        if (field->cpp_type() == FieldDescriptor::CPPTYPE_FLOAT) {
          rep ? r->AddFloat(message, field, v) : r->SetFloat(message, field, v);
        } else {
          rep ? r->AddDouble(message, field, v) : r->SetDouble(message, field, v);
        }
        break;
      }
      case FieldDescriptor::CPPTYPE_BOOL: {
        bool v;
        if (!YAML::convert<bool>::decode(node, v)) return bad("true or false");
        rep ? r->AddBool(message, field, v) : r->SetBool(message, field, v);
        break;
      }
      case FieldDescriptor::CPPTYPE_STRING:
        rep ? r->AddString(message, field, text) : r->SetString(message, field, text);
        break;
      case FieldDescriptor::CPPTYPE_ENUM: {
        const auto* value = ParseEnumShortName(field->enum_type(), text);
        if (value == nullptr) {
          return bad(
              absl::StrCat("one of ", absl::StrJoin(EnumShortNames(field->enum_type()), ", ")));
        }
        rep ? r->AddEnum(message, field, value) : r->SetEnum(message, field, value);
        break;
      }
      case FieldDescriptor::CPPTYPE_MESSAGE:
        return Error(node, absl::StrCat("'", path, "' must be a mapping"));
    }
    return absl::OkStatus();
  }

  // A YAML record as JSON. Every field of a dataset record is text, so scalars stay strings as
  // written (`answer: yes` is "yes", `answer: 42` is "42": YAML 1.1 would make them a boolean
  // and a number, which the record then refuses); only a missing value (`input:`, `~`, null)
  // is null.
  // `*budget` (bytes) goes down by each value's size; below 0 the rest is left out.
  static nlohmann::json ToJson(const YAML::Node& node, int64_t* budget) {
    *budget -= 64;  // about what a JSON value takes beside its text
    if (*budget < 0) return nullptr;
    if (node.IsMap()) {
      nlohmann::json object = nlohmann::json::object();
      for (const auto& entry : node) {
        *budget -= static_cast<int64_t>(entry.first.Scalar().size());
        object[entry.first.Scalar()] = ToJson(entry.second, budget);
        if (*budget < 0) break;
      }
      return object;
    }
    if (node.IsSequence()) {
      nlohmann::json array = nlohmann::json::array();
      for (const auto& item : node) {
        array.push_back(ToJson(item, budget));
        if (*budget < 0) break;
      }
      return array;
    }
    if (node.IsNull()) return nullptr;
    *budget -= static_cast<int64_t>(node.Scalar().size());
    return node.Scalar();
  }

  static std::string Describe(const std::string& path) {
    return path.empty() ? "the job spec" : absl::StrCat("'", path, "'");
  }

  absl::Status Error(const YAML::Node& node, const std::string& message) const {
    return absl::InvalidArgumentError(
        absl::StrCat(source_, ":", node.Mark().line + 1, ": ", message));
  }

  std::string source_;
  int64_t inline_bytes_left_ = kMaxInlineExamplesBytes;  // of all inline examples
};

void EmitScalar(YAML::Emitter& out, const Message& message, const FieldDescriptor* field,
                int index) {
  const Reflection* r = message.GetReflection();
  const bool rep = field->is_repeated();
  switch (field->cpp_type()) {
    case FieldDescriptor::CPPTYPE_INT32:
      out << (rep ? r->GetRepeatedInt32(message, field, index) : r->GetInt32(message, field));
      break;
    case FieldDescriptor::CPPTYPE_INT64:
      out << (rep ? r->GetRepeatedInt64(message, field, index) : r->GetInt64(message, field));
      break;
    case FieldDescriptor::CPPTYPE_UINT32:
      out << (rep ? r->GetRepeatedUInt32(message, field, index) : r->GetUInt32(message, field));
      break;
    case FieldDescriptor::CPPTYPE_UINT64:
      out << (rep ? r->GetRepeatedUInt64(message, field, index) : r->GetUInt64(message, field));
      break;
    case FieldDescriptor::CPPTYPE_DOUBLE:
      out << ShortestText(rep ? r->GetRepeatedDouble(message, field, index)
                              : r->GetDouble(message, field));
      break;
    case FieldDescriptor::CPPTYPE_FLOAT:
      out << ShortestText(rep ? r->GetRepeatedFloat(message, field, index)
                              : r->GetFloat(message, field));
      break;
    case FieldDescriptor::CPPTYPE_BOOL:
      out << (rep ? r->GetRepeatedBool(message, field, index) : r->GetBool(message, field));
      break;
    case FieldDescriptor::CPPTYPE_STRING:
      out << (rep ? r->GetRepeatedString(message, field, index) : r->GetString(message, field));
      break;
    case FieldDescriptor::CPPTYPE_ENUM:
      out << EnumShortName(rep ? r->GetRepeatedEnum(message, field, index)
                               : r->GetEnum(message, field));
      break;
    case FieldDescriptor::CPPTYPE_MESSAGE:
      break;  // handled by EmitMessage
  }
}

void EmitMessage(YAML::Emitter& out, const Message& message) {
  // The same shorthand the parser reads: a record is its JSON text.
  if (message.GetDescriptor()->full_name() == kInlineExample) {
    out << static_cast<const lorad::v1::InlineExample&>(message).json();
    return;
  }
  out << YAML::BeginMap;
  std::vector<const FieldDescriptor*> fields;
  message.GetReflection()->ListFields(message, &fields);  // set fields only, in field order
  for (const FieldDescriptor* field : fields) {
    out << YAML::Key << field->name() << YAML::Value;
    const bool is_message = field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE;
    if (!field->is_repeated()) {
      if (is_message) {
        EmitMessage(out, message.GetReflection()->GetMessage(message, field));
      } else {
        EmitScalar(out, message, field, 0);
      }
      continue;
    }
    const int count = message.GetReflection()->FieldSize(message, field);
    out << (is_message ? YAML::Block : YAML::Flow) << YAML::BeginSeq;
    for (int i = 0; i < count; ++i) {
      if (is_message) {
        EmitMessage(out, message.GetReflection()->GetRepeatedMessage(message, field, i));
      } else {
        EmitScalar(out, message, field, i);
      }
    }
    out << YAML::EndSeq;
  }
  out << YAML::EndMap;
}

}  // namespace

absl::StatusOr<lorad::v1::JobSpec> ParseJobSpecYaml(const std::string& text,
                                                    const std::string& source) {
  YAML::Node root;
  try {
    // One job per file: a second document (after `---`) would be silently left out.
    std::vector<YAML::Node> documents = YAML::LoadAll(text);
    for (size_t i = 1; i < documents.size(); ++i) {  // empty ones (a stray `---`) are fine
      if (documents[i].IsNull()) continue;
      return absl::InvalidArgumentError(
          absl::StrCat(source, ":", documents[i].Mark().line + 1,
                       ": a second YAML document; a job file holds one job (submit each "
                       "job from a file of its own)"));
    }
    if (!documents.empty()) root = documents[0];
  } catch (const YAML::Exception& e) {
    const std::string where =
        e.mark.is_null() ? source : absl::StrCat(source, ":", e.mark.line + 1);
    return absl::InvalidArgumentError(absl::StrCat(where, ": not valid YAML: ", e.msg));
  }
  if (!root.IsDefined() || root.IsNull()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": the file is empty"));
  }
  lorad::v1::JobSpec spec;
  if (auto status = YamlToProto(source).FillMessage(root, "", &spec); !status.ok()) return status;
  return spec;
}

namespace {

absl::StatusOr<lorad::v1::JobSpec> ParseLoadedJobSpec(const std::string& text,
                                                      const std::string& source) {
  if (text.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": not a text file (it holds NUL bytes)"));
  }
  return ParseJobSpecYaml(text, source);
}

}  // namespace

absl::StatusOr<lorad::v1::JobSpec> LoadJobSpecYaml(const std::string& path) {
  // All of these are a bad job file (exit 2), whatever the reason. "-" and a pipe are read once,
  // as a file is (`docker compose exec -T lorad loradctl train submit - < job.yaml`: the file
  // is on the host, loradctl in the container).
  std::stringstream text;
  if (path == "-") {
    if (isatty(STDIN_FILENO)) {  // typed by hand: say what it waits for
      std::cerr << "loradctl: reading the job from stdin (end it with Ctrl-D)" << std::endl;
    }
    text << std::cin.rdbuf();
    return ParseLoadedJobSpec(text.str(), "<stdin>");
  }
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::is_regular_file(status) && !std::filesystem::is_fifo(status) &&
      !std::filesystem::is_character_file(status)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": ", std::filesystem::exists(status) ? "not a regular file" : "no such file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(path, ": cannot be read"));
  text << in.rdbuf();
  return ParseLoadedJobSpec(text.str(), path);
}

std::string JobSpecToYaml(const lorad::v1::JobSpec& spec) {
  // What SubmitJob fills from init_adapter is left out: submitted again, the job continues the
  // adapter's current version, with its settings.
  lorad::v1::JobSpec editable = spec;
  editable.clear_init_adapter_path();
  editable.clear_init_adapter_version();
  editable.clear_init_adapter_fingerprint();
  if (!editable.init_adapter().empty()) editable.clear_lora();
  YAML::Emitter out;
  EmitMessage(out, editable);
  return std::string(out.c_str()) + "\n";
}

}  // namespace lorad::cli
