#include "engine/train/rouge.h"

#include <algorithm>
#include <map>

namespace lorad::engine {
namespace {

double FMeasure(double overlap, double predicted, double reference) {
  if (overlap <= 0 || predicted <= 0 || reference <= 0) return 0;
  const double precision = overlap / predicted;
  const double recall = overlap / reference;
  return 2 * precision * recall / (precision + recall);
}

double RougeN(const std::vector<std::string>& pred, const std::vector<std::string>& ref, size_t n) {
  auto grams = [n](const std::vector<std::string>& tokens) {
    std::map<std::vector<std::string>, int> counts;
    for (size_t i = 0; i + n <= tokens.size(); ++i) {
      ++counts[std::vector<std::string>(tokens.begin() + i, tokens.begin() + i + n)];
    }
    return counts;
  };
  const auto p = grams(pred);
  const auto r = grams(ref);
  double overlap = 0, p_total = 0, r_total = 0;
  for (const auto& [g, c] : p) p_total += c;
  for (const auto& [g, c] : r) {
    r_total += c;
    const auto it = p.find(g);
    if (it != p.end()) overlap += std::min(c, it->second);
  }
  return FMeasure(overlap, p_total, r_total);
}

double RougeL(const std::vector<std::string>& pred, const std::vector<std::string>& ref) {
  // Longest common subsequence, one row of the table at a time.
  std::vector<int> prev(ref.size() + 1, 0), row(ref.size() + 1, 0);
  for (const std::string& p : pred) {
    for (size_t j = 1; j <= ref.size(); ++j) {
      row[j] = p == ref[j - 1] ? prev[j - 1] + 1 : std::max(prev[j], row[j - 1]);
    }
    std::swap(prev, row);
  }
  return FMeasure(prev[ref.size()], static_cast<double>(pred.size()),
                  static_cast<double>(ref.size()));
}

}  // namespace

std::vector<std::string> RougeTokens(const std::string& text) {
  std::vector<std::string> tokens;
  std::string current;
  for (char ch : text) {
    const char c = (ch >= 'A' && ch <= 'Z') ? static_cast<char>(ch - 'A' + 'a') : ch;
    if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')) {
      current.push_back(c);
    } else if (!current.empty()) {
      tokens.push_back(std::move(current));
      current.clear();
    }
  }
  if (!current.empty()) tokens.push_back(std::move(current));
  return tokens;
}

RougeScores Rouge(const std::string& prediction, const std::string& reference) {
  const auto pred = RougeTokens(prediction);
  const auto ref = RougeTokens(reference);
  return {RougeN(pred, ref, 1), RougeN(pred, ref, 2), RougeL(pred, ref)};
}

}  // namespace lorad::engine
