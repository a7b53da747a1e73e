#include "engine/model/utf8.h"

#include <cstdint>

namespace lorad::engine {
namespace {

enum class Step { kChar, kInvalid, kTruncated };

// Classifies the sequence starting at `i`: a complete character, an ill-formed subsequence (its
// length in *len), or a valid prefix cut off by the end of the input.
Step Classify(std::string_view s, size_t i, size_t* len) {
  const auto b = static_cast<uint8_t>(s[i]);
  if (b < 0x80) {
    *len = 1;
    return Step::kChar;
  }
  int needed = 0;
  uint8_t lower = 0x80, upper = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) {
    needed = 1;
  } else if (b >= 0xE0 && b <= 0xEF) {
    needed = 2;
    if (b == 0xE0) lower = 0xA0;  // overlong
    if (b == 0xED) upper = 0x9F;  // surrogates
  } else if (b >= 0xF0 && b <= 0xF4) {
    needed = 3;
    if (b == 0xF0) lower = 0x90;  // overlong
    if (b == 0xF4) upper = 0x8F;  // beyond U+10FFFF
  } else {
    *len = 1;
    return Step::kInvalid;
  }
  size_t j = i + 1;
  for (int k = 0; k < needed; ++k, ++j) {
    if (j >= s.size()) {
      *len = j - i;
      return Step::kTruncated;
    }
    const auto c = static_cast<uint8_t>(s[j]);
    if (c < lower || c > upper) {
      *len = j - i;
      return Step::kInvalid;
    }
    lower = 0x80;
    upper = 0xBF;
  }
  *len = j - i;
  return Step::kChar;
}

}  // namespace

size_t FirstInvalidUtf8Byte(std::string_view bytes) {
  for (size_t i = 0, len = 0; i < bytes.size(); i += len) {
    if (Classify(bytes, i, &len) != Step::kChar) return i;
  }
  return std::string_view::npos;
}

bool IsValidUtf8(std::string_view bytes) {
  return FirstInvalidUtf8Byte(bytes) == std::string_view::npos;
}

size_t AppendUtf8Lossy(std::string_view bytes, bool final, std::string* out,
                       bool replacement_per_byte) {
  size_t i = 0;
  while (i < bytes.size()) {
    size_t len = 0;
    switch (Classify(bytes, i, &len)) {
      case Step::kChar:
        out->append(bytes.substr(i, len));
        break;
      case Step::kInvalid:
        out->append(kReplacementChar);
        if (replacement_per_byte) len = 1;  // the next byte may start a valid character
        break;
      case Step::kTruncated:
        if (!final) return i;
        out->append(kReplacementChar);
        if (replacement_per_byte) len = 1;
        break;
    }
    i += len;
  }
  return i;
}

int HexValue(std::string_view digits) {
  if (digits.empty() || digits.size() > 7) return -1;
  int value = 0;
  for (char c : digits) {
    const int digit = c >= '0' && c <= '9'   ? c - '0'
                      : c >= 'A' && c <= 'F' ? c - 'A' + 10
                      : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                             : -1;
    if (digit < 0) return -1;
    value = value * 16 + digit;
  }
  return value;
}

int ByteFallbackValue(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return -1;
  return HexValue(piece.substr(3, 2));
}

void AppendByteFallbackRun(std::string_view run, std::string* out) {
  if (IsValidUtf8(run)) {
    out->append(run);
    return;
  }
  for (size_t i = 0; i < run.size(); ++i) out->append(kReplacementChar);
}

std::string Utf8Lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  AppendUtf8Lossy(bytes, /*final=*/true, &out);
  return out;
}

std::string Utf8Shortened(std::string_view text, size_t max_bytes) {
  if (text.size() <= max_bytes) return std::string(text);
  size_t cut = max_bytes;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return std::string(text.substr(0, cut)) + "...";
}

char32_t NextCodePoint(std::string_view text, size_t* pos) {
  size_t len = 0;
  if (Classify(text, *pos, &len) != Step::kChar) {
    *pos += 1;
    return 0xFFFD;
  }
  const auto* p = reinterpret_cast<const uint8_t*>(text.data() + *pos);
  *pos += len;
  switch (len) {
    case 1:
      return p[0];
    case 2:
      return ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
    case 3:
      return ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
    default:
      return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) |
             (p[3] & 0x3Fu);
  }
}

void AppendCodePoint(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsUnicodeWhitespace(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

}  // namespace lorad::engine
