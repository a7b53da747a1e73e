// SplitRegex: a tokenizer.json pre-tokenizer regex (written for Oniguruma, which the `tokenizers`
// library uses) run on RE2, splitting text the way the Split pre-tokenizer's "Isolated" behavior
// does: every match is a piece and so is every stretch of text between matches.
//
// Oniguruma and RE2 differ where these regexes care, so the pattern is translated:
//  - \s, \S, \d, \w mean their Unicode classes (RE2's are ASCII-only);
//  - `\s+(?!\S)` (whitespace not followed by a non-space; RE2 has no lookahead) becomes a
//    capturing `(\s+)`, and a match of it that stops before a non-space gives back its last
//    character, which is what Oniguruma's backtracking into the lookahead produces.
// Other lookarounds, atomic groups and possessive quantifiers are refused.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace re2 {
class RE2;
}

namespace lorad::engine {

class SplitRegex {
 public:
  // `where` names the file and field in errors, e.g. "tokenizer.json: pre_tokenizer.pattern".
  static absl::StatusOr<SplitRegex> Compile(std::string_view pattern, const std::string& where);
  // A regex matching `literal` exactly (Split pre-tokenizer with {"String": ...}).
  static absl::StatusOr<SplitRegex> Literal(std::string_view literal, const std::string& where);

  SplitRegex(SplitRegex&&) noexcept;
  SplitRegex& operator=(SplitRegex&&) noexcept;
  ~SplitRegex();

  // Appends the pieces of `text` (valid UTF-8) to `out`, in order; they concatenate to `text`.
  void Split(std::string_view text, std::vector<std::string_view>* out) const;

  // The RE2 pattern actually compiled (for error messages and tests).
  const std::string& translated() const { return translated_; }

 private:
  SplitRegex() = default;
  std::unique_ptr<re2::RE2> re_;
  std::string translated_;
  bool lookahead_group_ = false;  // group 1 stands for `\s+(?!\S)`
};

}  // namespace lorad::engine
