#include "engine/model/json_file.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
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
