#include "engine/train/answer_evaluation.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {

absl::StatusOr<std::optional<ExampleAnswerer>> ExampleAnswerer::Start(const LlamaModel& model,
                                                                      const Tokenizer& tokenizer,
                                                                      const TokenizedExample& row,
                                                                      int64_t max_new_tokens,
                                                                      std::string end_of_turn) {
  if (row.response_start <= 0) return std::optional<ExampleAnswerer>();  // no prompt to answer
  const int64_t budget = std::min<int64_t>(
      max_new_tokens, model.config().max_position_embeddings - row.response_start);
  if (budget <= 0) return std::optional<ExampleAnswerer>();
  ExampleAnswerer a;
  a.model_ = &model;
  a.tokenizer_ = &tokenizer;
  a.row_ = &row;
  a.end_of_turn_ = std::move(end_of_turn);
  a.budget_ = budget;
  try {
    auto cache = model.NewCache(1, row.response_start + budget);
    if (!cache.ok()) return cache.status();
    a.cache_ = *std::move(cache);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("answering held-out prompts: ", e.what_without_backtrace()));
  }
  a.next_input_.assign(row.input_ids.begin(), row.input_ids.begin() + row.response_start);
  return std::optional<ExampleAnswerer>(std::move(a));
}

absl::StatusOr<std::optional<AnsweredExample>> ExampleAnswerer::Advance(
    const LoraAdapter& adapter) {
  if (forwards_ >= budget_) return std::optional<AnsweredExample>(Scored());
  try {
    torch::NoGradGuard no_grad;
    ForwardOptions options;
    options.adapter = &adapter;
    options.logits = LogitsMode::kLast;
    ForwardBatch batch;
    batch.input_ids = torch::tensor(next_input_, torch::kLong).unsqueeze(0);
    auto logits = model_->Forward(batch, cache_.get(), options);
    if (!logits.ok()) return logits.status();
    ++forwards_;
    const auto next = static_cast<int32_t>(logits->argmax(-1).item<int64_t>());
    if (tokenizer_->IsEos(next)) return std::optional<AnsweredExample>(Scored());
    generated_.push_back(next);
    if ((!end_of_turn_.empty() && tokenizer_->Piece(next) == end_of_turn_) ||
        forwards_ >= budget_) {
      return std::optional<AnsweredExample>(Scored());
    }
    next_input_ = {static_cast<int64_t>(next)};
    return std::optional<AnsweredExample>();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("answering held-out prompts: ", e.what_without_backtrace()));
  }
}

std::string ExampleAnswerer::Reply(std::vector<int32_t> ids) const {
  // The end-of-turn token is a special token that decoding would drop, so it is found by id
  // first; its text may also span several tokens, so the decoded text is cut at it too.
  if (!end_of_turn_.empty()) {
    auto end = std::find_if(ids.begin(), ids.end(),
                            [&](int32_t id) { return tokenizer_->Piece(id) == end_of_turn_; });
    ids.erase(end, ids.end());
  }
  std::string text = tokenizer_->Decode(ids, /*skip_special_tokens=*/true);
  if (!end_of_turn_.empty()) text = text.substr(0, text.find(end_of_turn_));
  return text;
}

AnsweredExample ExampleAnswerer::Scored() const {
  AnsweredExample e;
  e.line = row_->line;
  e.prediction = Reply(generated_);
  e.reference = Reply(
      std::vector<int32_t>(row_->input_ids.begin() + row_->response_start, row_->input_ids.end()));
  e.scores = Rouge(e.prediction, e.reference);
  e.generated_tokens = forwards_;
  return e;
}

absl::StatusOr<std::optional<AnsweredExample>> AnswerExample(
    const LlamaModel& model, const LoraAdapter& adapter, const Tokenizer& tokenizer,
    const TokenizedExample& row, int64_t max_new_tokens, const std::string& end_of_turn) {
  auto answerer = ExampleAnswerer::Start(model, tokenizer, row, max_new_tokens, end_of_turn);
  if (!answerer.ok()) return answerer.status();
  if (!answerer->has_value()) return std::optional<AnsweredExample>();
  while (true) {
    auto answered = (*answerer)->Advance(adapter);
    if (!answered.ok() || answered->has_value()) return answered;
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
                                  {"prediction_tokens", e.generated_tokens},
                                  {"rouge1", e.scores.rouge1},
                                  {"rouge2", e.scores.rouge2},
                                  {"rougeL", e.scores.rouge_l}});
  }
  return report.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

}  // namespace lorad::engine
