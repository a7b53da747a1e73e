#include "clients/loradctl/utf8_fields.h"

#include <iostream>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/model/utf8.h"

namespace lorad::cli {
namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;

std::optional<std::string> Check(const Message& message, const std::string& prefix) {
  const auto* reflection = message.GetReflection();
  const auto* descriptor = message.GetDescriptor();
  for (int f = 0; f < descriptor->field_count(); ++f) {
    const FieldDescriptor* field = descriptor->field(f);
    const std::string name = absl::StrCat(prefix, field->name());
    const bool repeated = field->is_repeated();
    const int count = repeated ? reflection->FieldSize(message, field)
                               : (reflection->HasField(message, field) ? 1 : 0);
    for (int i = 0; i < count; ++i) {
      const std::string at = repeated ? absl::StrCat(name, "[", i, "]") : name;
      if (field->type() == FieldDescriptor::TYPE_STRING) {
        std::string scratch;
        const std::string& text =
            repeated ? reflection->GetRepeatedStringReference(message, field, i, &scratch)
                     : reflection->GetStringReference(message, field, &scratch);
        if (const size_t bad = engine::FirstInvalidUtf8Byte(text); bad != std::string_view::npos) {
          return absl::StrFormat("%s: not UTF-8 (byte 0x%02X at offset %d)", at,
                                 static_cast<unsigned char>(text[bad]), bad);
        }
      } else if (field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
        const Message& inner = repeated ? reflection->GetRepeatedMessage(message, field, i)
                                        : reflection->GetMessage(message, field);
        if (auto found = Check(inner, at + "."); found) return found;
      }
    }
  }
  return std::nullopt;
}

}  // namespace

std::optional<std::string> FirstInvalidUtf8Field(const Message& message) {
  return Check(message, "");
}

bool ReportInvalidUtf8(const Message& message) {
  const auto problem = FirstInvalidUtf8Field(message);
  if (!problem) return false;
  std::cerr << "loradctl: " << *problem
            << "; lorad takes text as UTF-8: convert it first (e.g. iconv -f latin1 -t utf-8)"
            << std::endl;
  return true;
}

}  // namespace lorad::cli
