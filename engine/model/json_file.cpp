#include "engine/model/json_file.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/model/utf8.h"
#include "engine/runtime/durable_file.h"

namespace lorad::engine {

absl::Status CheckJsonNesting(std::string_view text, const std::string& source) {
  int depth = 0;
  JsonStringState strings;
  for (const char c : text) {
    if (strings.Feed(c)) continue;
    if (c == '[' || c == '{') {
      if (++depth > kMaxJsonNesting) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": JSON nested more than ", kMaxJsonNesting, " levels deep"));
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return absl::OkStatus();
}

namespace {

// The value of the 4 hex digits at text[at], or -1.
int Hex4(std::string_view text, size_t at) {
  return at + 4 <= text.size() ? HexValue(text.substr(at, 4)) : -1;
}

}  // namespace

std::string WithPythonJsonExtensions(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  JsonStringState strings;
  size_t i = 0;
  while (i < text.size()) {
    const char c = text[i];
    if (strings.in_string() && !strings.escaped() && c == '\\' && i + 1 < text.size() &&
        text[i + 1] == 'u') {
      // A whole \uXXXX escape at a time (the string state is the same after it as before).
      const int unit = Hex4(text, i + 2);
      const bool high = unit >= 0xD800 && unit <= 0xDBFF;
      const bool low = unit >= 0xDC00 && unit <= 0xDFFF;
      if (high && i + 12 <= text.size() && text[i + 6] == '\\' && text[i + 7] == 'u') {
        const int next = Hex4(text, i + 8);
        if (next >= 0xDC00 && next <= 0xDFFF) {  // a pair: one character
          out.append(text.substr(i, 12));
          i += 12;
          continue;
        }
      }
      if (high || low) {
        out += "\\ufffd";
        i += 6;
        continue;
      }
    }
    if (!strings.in_string()) {
      // Python's constants for the floats JSON has no spelling for.
      bool replaced = false;
      for (const std::string_view constant : {"NaN", "Infinity", "-Infinity"}) {
        if (text.substr(i, constant.size()) == constant) {
          out += "null";
          i += constant.size();
          replaced = true;
          break;
        }
      }
      if (replaced) continue;
    }
    strings.Feed(c);
    out += c;
    ++i;
  }
  return out;
}

absl::StatusOr<std::optional<nlohmann::json>> ReadJsonObjectIfPresent(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return std::optional<nlohmann::json>();
  auto text = ReadRegularFile(path, path);  // a FIFO in its place is refused, not waited on
  if (!text.ok()) return text.status();
  if (auto s = CheckJsonNesting(*text, path); !s.ok()) return s;
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  return std::optional<nlohmann::json>(std::move(j));
}

}  // namespace lorad::engine
