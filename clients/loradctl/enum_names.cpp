#include "clients/loradctl/enum_names.h"

#include <cctype>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"

namespace lorad::cli {

namespace {

// "LrSchedule" -> "LR_SCHEDULE_".
std::string ValuePrefix(const google::protobuf::EnumDescriptor* type) {
  std::string prefix;
  for (char c : type->name()) {
    if (std::isupper(static_cast<unsigned char>(c)) && !prefix.empty()) prefix += '_';
    prefix += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  }
  return prefix + "_";
}

}  // namespace

std::string EnumShortName(const google::protobuf::EnumValueDescriptor* value) {
  std::string name = value->name();
  const std::string prefix = ValuePrefix(value->type());
  if (absl::StartsWith(name, prefix)) name = name.substr(prefix.size());
  return absl::AsciiStrToLower(name);
}

std::vector<std::string> EnumShortNames(const google::protobuf::EnumDescriptor* type) {
  std::vector<std::string> names;
  for (int i = 0; i < type->value_count(); ++i) names.push_back(EnumShortName(type->value(i)));
  return names;
}

const google::protobuf::EnumValueDescriptor* ParseEnumShortName(
    const google::protobuf::EnumDescriptor* type, const std::string& text) {
  for (int i = 0; i < type->value_count(); ++i) {
    const auto* value = type->value(i);
    if (absl::EqualsIgnoreCase(text, EnumShortName(value)) ||
        absl::EqualsIgnoreCase(text, value->name())) {
      return value;
    }
  }
  return nullptr;
}

}  // namespace lorad::cli
