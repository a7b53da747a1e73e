#include "clients/loradctl/utf8_fields.h"

#include <iostream>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lorad::cli {
namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;

// The offset of the first byte that does not start a well-formed UTF-8 sequence (RFC 3629: no
// overlong forms, no surrogates, nothing past U+10FFFF); npos when `text` is UTF-8.
size_t FirstInvalidByte(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto b = static_cast<unsigned char>(text[i]);
    size_t length = 0;
    unsigned char low = 0x80, high = 0xBF;  // the allowed range of the second byte
    if (b < 0x80) {
      length = 1;
    } else if (b >= 0xC2 && b <= 0xDF) {
      length = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
      length = 3;
      if (b == 0xE0) low = 0xA0;   // overlong
      if (b == 0xED) high = 0x9F;  // surrogates
    } else if (b >= 0xF0 && b <= 0xF4) {
      length = 4;
      if (b == 0xF0) low = 0x90;   // overlong
      if (b == 0xF4) high = 0x8F;  // past U+10FFFF
    } else {
      return i;
    }
    if (i + length > text.size()) return i;
    for (size_t k = 1; k < length; ++k) {
      const auto c = static_cast<unsigned char>(text[i + k]);
      if (k == 1 ? (c < low || c > high) : (c < 0x80 || c > 0xBF)) return i;
    }
    i += length;
  }
  return std::string_view::npos;
}

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
        if (const size_t bad = FirstInvalidByte(text); bad != std::string_view::npos) {
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
