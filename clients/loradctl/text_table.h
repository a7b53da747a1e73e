// TextTable: left-aligned columns separated by two spaces, for `train ls` and `adapters ls`.
#pragma once

#include <cstddef>
#include <ostream>
#include <string>
#include <vector>

namespace lorad::cli {

// The columns `text` (UTF-8) takes on a terminal.
std::size_t DisplayWidth(const std::string& text);

class TextTable {
 public:
  explicit TextTable(std::vector<std::string> header) { rows_.push_back(std::move(header)); }

  // A row shorter than the header leaves its last cells empty.
  void AddRow(std::vector<std::string> row) { rows_.push_back(std::move(row)); }

  // Writes the header and every row; the last column is not padded (no trailing spaces).
  void Print(std::ostream& out) const;

 private:
  std::vector<std::vector<std::string>> rows_;
};

}  // namespace lorad::cli
