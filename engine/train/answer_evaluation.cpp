#include "engine/train/answer_evaluation.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {

absl::StatusOr<std::optional<AnsweredExample>> AnswerExample(
    const LlamaModel& model, const LoraAdapter& adapter, const Tokenizer& tokenizer,
    const TokenizedExample& row, int64_t max_new_tokens, const std::string& end_of_turn) {
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
  if (row.response_start <= 0) return std::optional<AnsweredExample>();  // no prompt to answer
  try {
    torch::NoGradGuard no_grad;
    const std::vector<int64_t> prompt(row.input_ids.begin(),
                                      row.input_ids.begin() + row.response_start);
    const std::vector<int32_t> response(row.input_ids.begin() + row.response_start,
                                        row.input_ids.end());
    const int64_t budget =
        std::min<int64_t>(max_new_tokens, model.config().max_position_embeddings -
                                              static_cast<int64_t>(prompt.size()));
    if (budget <= 0) return std::optional<AnsweredExample>();
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
    return std::optional<AnsweredExample>(std::move(e));
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("answering held-out prompts: ", e.what_without_backtrace()));
  }
}

void AnswerEvaluation::Add(AnsweredExample example) {
  sum_.rouge1 += example.scores.rouge1;
  sum_.rouge2 += example.scores.rouge2;
  sum_.rouge_l += example.scores.rouge_l;
  examples.push_back(std::move(example));
  const double n = static_cast<double>(examples.size());
  mean = {sum_.rouge1 / n, sum_.rouge2 / n, sum_.rouge_l / n};
}

absl::StatusOr<AnswerEvaluation> EvaluateAnswers(const LlamaModel& model,
                                                 const LoraAdapter& adapter,
                                                 const Tokenizer& tokenizer,
                                                 const std::vector<TokenizedExample>& rows,
                                                 int64_t max_examples, int64_t max_new_tokens,
                                                 const std::string& end_of_turn) {
  AnswerEvaluation out;
  for (const TokenizedExample& row : rows) {
    if (static_cast<int64_t>(out.examples.size()) >= max_examples) break;
    auto answered = AnswerExample(model, adapter, tokenizer, row, max_new_tokens, end_of_turn);
    if (!answered.ok()) return answered.status();
    if (answered->has_value()) out.Add(**std::move(answered));
  }
  return out;
}

std::string EvaluationReportJson(int64_t step, const EvalMetrics& loss, size_t held_out,
                                 const AnswerEvaluation& answers) {
  // ROUGE is null, not 0, when no held-out example had a prompt to answer (plain text).
  const bool answered = !answers.examples.empty();
  auto score = [&](double v) { return answered ? nlohmann::json(v) : nlohmann::json(); };
  nlohmann::json report = {{"step", step},
                           {"adapter_step", loss.step},
                           {"validation_loss", loss.loss},
                           {"validation_tokens", loss.tokens},
                           {"held_out", held_out},
                           {"answered", answers.examples.size()},
                           {"rouge1", score(answers.mean.rouge1)},
                           {"rouge2", score(answers.mean.rouge2)},
                           {"rougeL", score(answers.mean.rouge_l)},
                           {"examples", nlohmann::json::array()}};
  for (const AnsweredExample& e : answers.examples) {
    report["examples"].push_back({{"line", e.line},
                                  {"prediction", e.prediction},
                                  {"reference", e.reference},
                                  {"rouge1", e.scores.rouge1},
                                  {"rouge2", e.scores.rouge2},
                                  {"rougeL", e.scores.rouge_l}});
  }
  return report.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

}  // namespace lorad::engine
