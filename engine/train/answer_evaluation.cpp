#include "engine/train/answer_evaluation.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lorad::engine {

absl::StatusOr<AnswerEvaluation> EvaluateAnswers(const LlamaModel& model,
                                                 const LoraAdapter& adapter,
                                                 const Tokenizer& tokenizer,
                                                 const std::vector<TokenizedExample>& rows,
                                                 int64_t max_examples, int64_t max_new_tokens,
                                                 const std::string& end_of_turn) {
  // The reply's text: its tokens up to the end-of-turn token (a special token that decoding
  // would drop, so it is found by id first), decoded, then cut at the end-of-turn text (which
  // may span several tokens); all of it without an end of turn.
  const auto reply = [&](std::vector<int32_t> ids) {
    if (!end_of_turn.empty()) {
      auto end = std::find_if(ids.begin(), ids.end(),
                              [&](int32_t id) { return tokenizer.Piece(id) == end_of_turn; });
      ids.erase(end, ids.end());
    }
    std::string text = tokenizer.Decode(ids, /*skip_special_tokens=*/true);
    if (!end_of_turn.empty()) text = text.substr(0, text.find(end_of_turn));
    return text;
  };
  AnswerEvaluation out;
  try {
    torch::NoGradGuard no_grad;
    for (const TokenizedExample& row : rows) {
      if (static_cast<int64_t>(out.examples.size()) >= max_examples) break;
      if (row.response_start <= 0) continue;  // plain text: no prompt to answer
      const std::vector<int64_t> prompt(row.input_ids.begin(),
                                        row.input_ids.begin() + row.response_start);
      const std::vector<int32_t> response(row.input_ids.begin() + row.response_start,
                                          row.input_ids.end());
      const int64_t budget =
          std::min<int64_t>(max_new_tokens, model.config().max_position_embeddings -
                                                static_cast<int64_t>(prompt.size()));
      if (budget <= 0) continue;
      auto cache = model.NewCache(1, static_cast<int64_t>(prompt.size()) + budget);
      if (!cache.ok()) return cache.status();
      ForwardOptions options;
      options.adapter = &adapter;
      options.logits = LogitsMode::kLast;
      ForwardBatch batch;
      batch.input_ids = torch::tensor(prompt, torch::kLong).unsqueeze(0);
      std::vector<int32_t> generated;
      for (int64_t step = 0; step < budget; ++step) {
        auto logits = model.Forward(batch, cache->get(), options);
        if (!logits.ok()) return logits.status();
        const auto next = static_cast<int32_t>(logits->argmax(-1).item<int64_t>());
        if (tokenizer.IsEos(next)) break;
        generated.push_back(next);
        if (!end_of_turn.empty() && tokenizer.Piece(next) == end_of_turn) break;
        batch.input_ids = torch::tensor({static_cast<int64_t>(next)}, torch::kLong).view({1, 1});
      }
      AnsweredExample e;
      e.line = row.line;
      e.prediction = reply(generated);
      e.reference = reply(response);
      e.scores = Rouge(e.prediction, e.reference);
      out.mean.rouge1 += e.scores.rouge1;
      out.mean.rouge2 += e.scores.rouge2;
      out.mean.rouge_l += e.scores.rouge_l;
      out.examples.push_back(std::move(e));
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("answering held-out prompts: ", e.what_without_backtrace()));
  }
  if (!out.examples.empty()) {
    const double n = static_cast<double>(out.examples.size());
    out.mean = {out.mean.rouge1 / n, out.mean.rouge2 / n, out.mean.rouge_l / n};
  }
  return out;
}

}  // namespace lorad::engine
