// Rouge: ROUGE-1, ROUGE-2 and ROUGE-L F-measures of a generated text against a reference, as
// Google's rouge_score package computes them without stemming (the usual choice for evaluating
// fine-tunes): lower-cased, every run of characters outside [a-z0-9] is a separator, n-gram
// overlap counts clipped per n-gram, ROUGE-L from the longest common subsequence.
// tests/parity/rouge_parity_test.cpp checks it against rouge_score.
#pragma once

#include <string>
#include <vector>

namespace lorad::engine {

struct RougeScores {
  double rouge1 = 0;
  double rouge2 = 0;
  double rouge_l = 0;
};

// rouge_score's default tokenizer.
std::vector<std::string> RougeTokens(const std::string& text);

RougeScores Rouge(const std::string& prediction, const std::string& reference);

}  // namespace lorad::engine
