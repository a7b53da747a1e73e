#include "engine/model/split_regex.h"

#include <re2/re2.h>

#include "absl/strings/str_cat.h"
#include "engine/model/utf8.h"

namespace lorad::engine {
namespace {

// Unicode White_Space, the class Oniguruma's \s matches, as RE2 class contents.
constexpr std::string_view kSpaceRanges =
    "\\x{9}-\\x{D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
    "\\x{205F}\\x{3000}";
constexpr std::string_view kDigitRanges = "\\p{Nd}";
constexpr std::string_view kWordRanges = "\\p{L}\\p{M}\\p{Nd}\\p{Pc}";
constexpr std::string_view kLookahead = "\\s+(?!\\S)";

absl::Status Unsupported(const std::string& where, std::string_view pattern,
                         std::string_view what) {
  return absl::UnimplementedError(absl::StrCat(where, ": the regex '", std::string(pattern),
                                               "' uses ", std::string(what),
                                               ", which lorad's tokenizer does not support"));
}

struct Translation {
  std::string re2;
  bool lookahead_group = false;
};

absl::StatusOr<Translation> Translate(std::string_view p, const std::string& where) {
  Translation t;
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (!in_class && p.compare(i, kLookahead.size(), kLookahead) == 0) {
      if (t.lookahead_group) return Unsupported(where, p, "`\\s+(?!\\S)` twice");
      // The emulation treats a match of the group as the whole match: it must be a top-level
      // alternative of its own, as in every published pre-tokenizer regex.
      const size_t after = i + kLookahead.size();
      if ((i > 0 && p[i - 1] != '|') || (after < p.size() && p[after] != '|')) {
        return Unsupported(where, p, "`\\s+(?!\\S)` inside a larger alternative");
      }
      absl::StrAppend(&t.re2, "([", std::string(kSpaceRanges), "]+)");
      t.lookahead_group = true;
      i += kLookahead.size() - 1;
      continue;
    }
    if (c == '\\' && i + 1 < p.size()) {
      const char e = p[i + 1];
      std::string_view ranges;
      if (e == 's' || e == 'S') ranges = kSpaceRanges;
      if (e == 'd' || e == 'D') ranges = kDigitRanges;
      if (e == 'w' || e == 'W') ranges = kWordRanges;
      if ((e == 'p' || e == 'P') && i + 2 < p.size() && p[i + 2] == '{') {
        const size_t close = p.find('}', i);  // \p{L}: copied whole, braces included
        if (close == std::string_view::npos) return Unsupported(where, p, "an unclosed \\p{");
        t.re2.append(p.substr(i, close + 1 - i));
        i = close;
        continue;
      }
      if (ranges.empty()) {  // any other escape means the same in RE2 (\r, \n, \', ...)
        t.re2.append(p.substr(i, 2));
      } else if (in_class) {
        if (e == 'S' || e == 'D' || e == 'W') {
          return Unsupported(where, p, "a negated class escape inside [...]");
        }
        t.re2.append(ranges);
      } else {
        const bool negated = e == 'S' || e == 'D' || e == 'W';
        absl::StrAppend(&t.re2, negated ? "[^" : "[", std::string(ranges), "]");
      }
      ++i;
      continue;
    }
    if (in_class) {
      if (c == ']') in_class = false;
      t.re2.push_back(c);
      continue;
    }
    if (c == '[') {
      in_class = true;
      t.re2.push_back(c);
      // A ']' or '^]' right after '[' is a literal, not the end of the class.
      if (i + 1 < p.size() && p[i + 1] == '^') t.re2.push_back(p[++i]);
      if (i + 1 < p.size() && p[i + 1] == ']') t.re2.push_back(p[++i]);
      continue;
    }
    if (c == '(') {
      if (i + 1 < p.size() && p[i + 1] == '?') {
        const std::string_view rest = p.substr(i + 2, 2);
        if (!rest.empty() &&
            (rest[0] == '=' || rest[0] == '!' || rest[0] == '>' || rest == "<=" || rest == "<!")) {
          return Unsupported(where, p, "a lookaround or atomic group");
        }
        t.re2.push_back(c);
      } else {
        t.re2.append("(?:");  // keeps group 1 for the lookahead emulation
      }
      continue;
    }
    if ((c == '+' || c == '*' || c == '?') && i + 1 < p.size() && p[i + 1] == '+') {
      return Unsupported(where, p, "a possessive quantifier");
    }
    t.re2.push_back(c);
  }
  return t;
}

}  // namespace

SplitRegex::SplitRegex(SplitRegex&&) noexcept = default;
SplitRegex& SplitRegex::operator=(SplitRegex&&) noexcept = default;
SplitRegex::~SplitRegex() = default;

absl::StatusOr<SplitRegex> SplitRegex::Compile(std::string_view pattern, const std::string& where) {
  absl::StatusOr<Translation> t = Translate(pattern, where);
  if (!t.ok()) return t.status();
  RE2::Options options;
  options.set_log_errors(false);
  SplitRegex r;
  r.translated_ = t->re2;
  r.lookahead_group_ = t->lookahead_group;
  r.re_ = std::make_unique<RE2>(r.translated_, options);
  if (!r.re_->ok()) {
    return absl::UnimplementedError(absl::StrCat(where, ": the regex '", std::string(pattern),
                                                 "' does not compile: ", r.re_->error()));
  }
  return r;
}

absl::StatusOr<SplitRegex> SplitRegex::Literal(std::string_view literal, const std::string& where) {
  if (literal.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": the split string is empty"));
  }
  RE2::Options options;
  options.set_log_errors(false);
  SplitRegex r;
  r.translated_ = RE2::QuoteMeta(re2::StringPiece(literal.data(), literal.size()));
  r.re_ = std::make_unique<RE2>(r.translated_, options);
  return r;
}

void SplitRegex::Split(std::string_view text, std::vector<std::string_view>* out) const {
  const re2::StringPiece input(text.data(), text.size());
  re2::StringPiece groups[2];
  const int ngroups = lookahead_group_ ? 2 : 1;
  size_t pos = 0;
  while (pos < text.size()) {
    if (!re_->Match(input, pos, text.size(), RE2::UNANCHORED, groups, ngroups)) break;
    const size_t start = groups[0].data() - text.data();
    size_t end = start + groups[0].size();
    if (end == start) {  // an empty match splits nothing; step over one character
      size_t next = start;
      NextCodePoint(text, &next);
      if (start > pos) out->push_back(text.substr(pos, start - pos));
      out->push_back(text.substr(start, next - start));
      pos = next;
      continue;
    }
    if (lookahead_group_ && groups[1].data() != nullptr && end < text.size()) {
      // `\s+` stopped before a non-space: the lookahead would have failed there, and
      // Oniguruma backtracks one character (when the run has more than one).
      size_t last = end - 1;
      while (last > start && (static_cast<unsigned char>(text[last]) & 0xC0) == 0x80) --last;
      if (last > start) end = last;
    }
    if (start > pos) out->push_back(text.substr(pos, start - pos));
    out->push_back(text.substr(start, end - start));
    pos = end;
  }
  if (pos < text.size()) out->push_back(text.substr(pos));
}

}  // namespace lorad::engine
