// ReadJsonObjectIfPresent: the model folder's small JSON files (tokenizer_config.json,
// special_tokens_map.json, generation_config.json, config.json), read one way: absent is not an
// error (each has defaults), anything else that is not a JSON object is, naming the file.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {

// The deepest nesting of arrays and objects lorad reads in a JSON file or record (the files it
// reads hold a few levels). Deeper text is refused before it is parsed: printing or walking such
// a value recurses once a level, and a million levels ran the stack out.
inline constexpr int kMaxJsonNesting = 64;

// Follows JSON text a character at a time to tell its strings (quotes and escapes included) from
// the rest, where brackets count.
class JsonStringState {
 public:
  // Feeds `c`; true when it belongs to a string.
  bool Feed(char c) {
    if (!in_string_) return in_string_ = c == '"';
    if (escaped_) {
      escaped_ = false;
    } else if (c == '\\') {
      escaped_ = true;
    } else if (c == '"') {
      in_string_ = false;
    }
    return true;
  }
  bool in_string() const { return in_string_; }
  // Inside a string, just after a backslash: the next character is the escaped one.
  bool escaped() const { return escaped_; }

 private:
  bool in_string_ = false;
  bool escaped_ = false;
};

// InvalidArgument naming `source` when `text` nests arrays or objects deeper than
// kMaxJsonNesting (brackets inside strings do not count; the text need not be valid JSON).
absl::Status CheckJsonNesting(std::string_view text, const std::string& source);

// `text` with what Python's json.dumps writes and json.loads reads back, beyond JSON, spelled as
// JSON: NaN, Infinity and -Infinity outside strings become null, and a \u escape of a lone UTF-16
// surrogate (scraped text, a string cut between the two halves of an emoji) becomes \ufffd, the
// replacement character. Nothing else changes; the text need not be valid JSON.
std::string WithPythonJsonExtensions(std::string_view text);

// The object in the file at `path`; nullopt when there is no such file. NotFound when it cannot
// be read, InvalidArgument when it is not one JSON object.
absl::StatusOr<std::optional<nlohmann::json>> ReadJsonObjectIfPresent(const std::string& path);

}  // namespace lorad::engine
