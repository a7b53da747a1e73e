#include "engine/model/added_vocabulary.h"

#include <algorithm>
#include <cctype>

#include "engine/model/utf8.h"

#if defined(LORAD_HAVE_ICU)
#include <unicode/uchar.h>
#else
#include <re2/re2.h>
#endif

namespace lorad::engine {
namespace {

// A word character, beside which a single_word token does not match: as Hugging Face tokenizers
// decides it (the Rust regex crate's \w), in any script: Alphabetic, a mark, a decimal digit,
// a connector ('_') or a joiner (ZWNJ, ZWJ). `ch` holds one UTF-8 character.
bool IsWordCharacter(std::string_view ch) {
  size_t pos = 0;
  const char32_t c = NextCodePoint(ch, &pos);
  if (c < 0x80) return c == '_' || std::isalnum(static_cast<int>(c)) != 0;
#if defined(LORAD_HAVE_ICU)
  const auto u = static_cast<UChar32>(c);
  if (u_hasBinaryProperty(u, UCHAR_ALPHABETIC) || u_hasBinaryProperty(u, UCHAR_JOIN_CONTROL)) {
    return true;
  }
  switch (u_charType(u)) {
    case U_NON_SPACING_MARK:
    case U_ENCLOSING_MARK:
    case U_COMBINING_SPACING_MARK:
    case U_DECIMAL_DIGIT_NUMBER:
    case U_CONNECTOR_PUNCTUATION:
      return true;
    default:
      return false;
  }
#else
  // Without ICU, by general category: the few Alphabetic characters outside them (e.g. some
  // circled letters, So) are missed.
  static const RE2 kWord("[\\p{L}\\p{M}\\p{Nd}\\p{Nl}\\p{Pc}\\x{200C}\\x{200D}]");
  return RE2::FullMatch(ch, kWord);
#endif
}

// Whether the character that ends at `end` (exclusive), or starts at `begin`, is a word character.
bool WordCharacterBefore(std::string_view text, size_t end) {
  size_t start = end - 1;
  while (start > 0 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
  return IsWordCharacter(text.substr(start, end - start));
}

bool WordCharacterAfter(std::string_view text, size_t begin) {
  size_t end = begin;
  NextCodePoint(text, &end);
  return IsWordCharacter(text.substr(begin, end - begin));
}

// Length of the whitespace run ending at `end` (exclusive), not crossing `floor`.
size_t WhitespaceBefore(std::string_view text, size_t floor, size_t end) {
  size_t start = end;
  while (start > floor) {
    // Step back over one UTF-8 character.
    size_t p = start - 1;
    while (p > floor && (static_cast<unsigned char>(text[p]) & 0xC0) == 0x80) --p;
    size_t q = p;
    if (!IsUnicodeWhitespace(NextCodePoint(text, &q))) break;
    start = p;
  }
  return end - start;
}

size_t WhitespaceAfter(std::string_view text, size_t begin) {
  size_t end = begin;
  while (end < text.size()) {
    size_t q = end;
    if (!IsUnicodeWhitespace(NextCodePoint(text, &q))) break;
    end = q;
  }
  return end - begin;
}

}  // namespace

void AddedVocabulary::Add(const AddedToken& token) {
  if (token.content.empty()) return;
  auto it = by_content_.find(token.content);
  if (it != by_content_.end()) {
    by_id_.erase(tokens_[it->second].id);
    tokens_[it->second] = token;
    by_id_[token.id] = it->second;
    return;
  }
  const size_t index = tokens_.size();
  tokens_.push_back(token);
  by_content_[token.content] = index;
  by_id_[token.id] = index;
  auto& bucket = by_first_byte_[static_cast<unsigned char>(token.content[0])];
  bucket.push_back(index);
  std::stable_sort(bucket.begin(), bucket.end(), [this](size_t a, size_t b) {
    return tokens_[a].content.size() > tokens_[b].content.size();
  });
}

std::vector<AddedVocabulary::Segment> AddedVocabulary::Split(std::string_view text) const {
  std::vector<Segment> out;
  size_t run_start = 0;  // start of the pending ordinary text
  size_t i = 0;
  auto flush = [&](size_t end) {
    if (end > run_start) out.push_back({text.substr(run_start, end - run_start), -1, run_start});
  };
  while (i < text.size()) {
    const AddedToken* match = nullptr;
    for (size_t index : by_first_byte_[static_cast<unsigned char>(text[i])]) {
      const AddedToken& t = tokens_[index];
      if (text.compare(i, t.content.size(), t.content) != 0) continue;
      if (t.single_word) {
        const size_t end = i + t.content.size();
        if ((i > 0 && WordCharacterBefore(text, i)) ||
            (end < text.size() && WordCharacterAfter(text, end))) {
          continue;
        }
      }
      match = &t;
      break;
    }
    if (match == nullptr) {
      ++i;
      continue;
    }
    size_t start = i;
    size_t end = i + match->content.size();
    if (match->lstrip) start -= WhitespaceBefore(text, run_start, start);
    if (match->rstrip) end += WhitespaceAfter(text, end);
    flush(start);
    out.push_back({text.substr(start, end - start), match->id, start});
    run_start = i = end;
  }
  flush(text.size());
  return out;
}

const AddedToken* AddedVocabulary::Find(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

std::optional<int32_t> AddedVocabulary::IdOf(std::string_view content) const {
  auto it = by_content_.find(std::string(content));
  if (it == by_content_.end()) return std::nullopt;
  return tokens_[it->second].id;
}

bool AddedVocabulary::IsSpecial(int32_t id) const {
  const AddedToken* t = Find(id);
  return t != nullptr && t->special;
}

int32_t AddedVocabulary::max_id() const {
  int32_t m = -1;
  for (const auto& t : tokens_) m = std::max(m, t.id);
  return m;
}

}  // namespace lorad::engine
