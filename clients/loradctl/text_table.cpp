#include "clients/loradctl/text_table.h"

#include <algorithm>

namespace lorad::cli {

namespace {

// Terminal columns of a code point: 0 for combining marks, 2 for East Asian wide and fullwidth
// characters and emoji (the ranges wcwidth gives 2 most often), else 1. Without the locale
// wcwidth needs.
std::size_t CodePointColumns(char32_t c) {
  if ((c >= 0x300 && c <= 0x36F) || (c >= 0x200B && c <= 0x200F) || c == 0xFE0F) return 0;
  const bool wide = (c >= 0x1100 && c <= 0x115F) || (c >= 0x2E80 && c <= 0xA4CF && c != 0x303F) ||
                    (c >= 0xAC00 && c <= 0xD7A3) || (c >= 0xF900 && c <= 0xFAFF) ||
                    (c >= 0xFE30 && c <= 0xFE4F) || (c >= 0xFF00 && c <= 0xFF60) ||
                    (c >= 0xFFE0 && c <= 0xFFE6) || (c >= 0x1F300 && c <= 0x1F64F) ||
                    (c >= 0x1F900 && c <= 0x1F9FF) || (c >= 0x20000 && c <= 0x3FFFD);
  return wide ? 2 : 1;
}

}  // namespace

// A cell's width on a terminal: "kundé" is 5 columns and 6 bytes (padding by bytes left the
// cells after a non-ASCII path out of line). Bytes that are not UTF-8 count one column each.
std::size_t DisplayWidth(const std::string& text) {
  std::size_t columns = 0;
  for (std::size_t i = 0; i < text.size();) {
    const auto lead = static_cast<unsigned char>(text[i]);
    const std::size_t length = lead < 0x80           ? 1
                               : (lead >> 5) == 0x6  ? 2
                               : (lead >> 4) == 0xE  ? 3
                               : (lead >> 3) == 0x1E ? 4
                                                     : 1;
    char32_t c = length == 1 ? lead : lead & (0x7F >> length);
    bool valid = i + length <= text.size();
    for (std::size_t k = 1; valid && k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      valid = (next & 0xC0) == 0x80;
      c = (c << 6) | (next & 0x3F);
    }
    if (!valid) {
      columns += 1;
      i += 1;
      continue;
    }
    columns += CodePointColumns(c);
    i += length;
  }
  return columns;
}

void TextTable::Print(std::ostream& out) const {
  const std::size_t columns = rows_.front().size();
  std::vector<std::size_t> width(columns, 0);
  for (const auto& row : rows_) {
    for (std::size_t c = 0; c < columns && c < row.size(); ++c) {
      width[c] = std::max(width[c], DisplayWidth(row[c]));
    }
  }
  for (const auto& row : rows_) {
    std::string line;
    for (std::size_t c = 0; c < columns; ++c) {
      const std::string cell = c < row.size() ? row[c] : "";
      line += cell;
      if (c + 1 < columns) line += std::string(width[c] - DisplayWidth(cell) + 2, ' ');
    }
    line.erase(line.find_last_not_of(' ') + 1);
    out << line << "\n";
  }
}

}  // namespace lorad::cli
