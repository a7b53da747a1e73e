#include "engine/train/answer_evaluation.h"

#include <algorithm>
#include <filesystem>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/runtime/durable_file.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {

int64_t ExampleAnswerer::Budget(const LlamaModel& model, const TokenizedExample& row,
                                int64_t max_new_tokens) {
  if (row.response_start <= 0) return 0;  // no prompt to answer
  return std::max<int64_t>(
      0, std::min<int64_t>(max_new_tokens,
                           model.config().max_position_embeddings - row.response_start));
}

std::vector<const TokenizedExample*> ExampleAnswerer::NextGroup(
    const LlamaModel& model, const std::vector<TokenizedExample>& rows, size_t* next,
    int64_t max_rows, int64_t max_new_tokens, int64_t max_tokens) {
  std::vector<const TokenizedExample*> group;
  int64_t widest = 0;
  while (*next < rows.size() && static_cast<int64_t>(group.size()) < max_rows) {
    const TokenizedExample& row = rows[*next];
    const int64_t budget = Budget(model, row, max_new_tokens);
    if (budget <= 0) {
      ++*next;
      continue;
    }
    const int64_t w = std::max(widest, row.response_start);
    const auto n = static_cast<int64_t>(group.size()) + 1;
    if (!group.empty() && (budget < max_new_tokens || n * (w + max_new_tokens) > max_tokens)) {
      break;
    }
    group.push_back(&row);
    ++*next;
    widest = w;
    if (budget < max_new_tokens) break;  // alone
  }
  return group;
}

absl::StatusOr<ExampleAnswerer> ExampleAnswerer::Start(const LlamaModel& model,
                                                       const Tokenizer& tokenizer,
                                                       std::vector<const TokenizedExample*> rows,
                                                       int64_t max_new_tokens,
                                                       std::string end_of_turn) {
  if (rows.empty()) return absl::InvalidArgumentError("ExampleAnswerer: no rows to answer");
  ExampleAnswerer a;
  a.model_ = &model;
  a.tokenizer_ = &tokenizer;
  a.end_of_turn_ = std::move(end_of_turn);
  a.budget_ = Budget(model, *rows[0], max_new_tokens);
  int64_t widest = 0;
  for (const TokenizedExample* row : rows) {
    // Every row of a group generates up to the same budget: then no row's positions run past
    // the model's context while it waits for the others.
    if (Budget(model, *row, max_new_tokens) != a.budget_ || a.budget_ <= 0) {
      return absl::InvalidArgumentError(
          "ExampleAnswerer: the rows of a group need the same budget, above 0");
    }
    widest = std::max<int64_t>(widest, row->response_start);
    Answer answer;
    answer.row = row;
    a.answers_.push_back(std::move(answer));
  }
  try {
    auto cache = model.NewCache(static_cast<int64_t>(rows.size()), widest + a.budget_);
    if (!cache.ok()) return cache.status();
    a.cache_ = *std::move(cache);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("answering held-out prompts: ", e.what_without_backtrace()));
  }
  return a;
}

absl::StatusOr<std::optional<std::vector<AnsweredExample>>> ExampleAnswerer::Advance(
    const LoraAdapter& adapter) {
  using Result = std::optional<std::vector<AnsweredExample>>;
  const auto rows = static_cast<int64_t>(answers_.size());
  try {
    torch::NoGradGuard no_grad;
    ForwardOptions options;
    options.adapter = &adapter;
    options.logits = LogitsMode::kLast;
    ForwardBatch batch;
    if (!prefilled_) {  // every prompt, right-padded to the longest
      int64_t widest = 0;
      for (const Answer& a : answers_) widest = std::max(widest, a.row->response_start);
      batch.input_ids = torch::zeros({rows, widest}, torch::kLong);
      auto ids = batch.input_ids.accessor<int64_t, 2>();
      for (int64_t r = 0; r < rows; ++r) {
        const TokenizedExample& row = *answers_[r].row;
        for (int64_t t = 0; t < row.response_start; ++t) ids[r][t] = row.input_ids[t];
        batch.lengths.push_back(row.response_start);
      }
    } else {  // each answer's last token (an ended one's too: its output is not read)
      batch.input_ids = torch::zeros({rows, 1}, torch::kLong);
      auto ids = batch.input_ids.accessor<int64_t, 2>();
      for (int64_t r = 0; r < rows; ++r) {
        const Answer& a = answers_[r];
        ids[r][0] = a.generated.empty() ? 0 : a.generated.back();
      }
    }
    auto logits = model_->Forward(batch, cache_.get(), options);
    if (!logits.ok()) return logits.status();
    prefilled_ = true;
    const torch::Tensor next = logits->argmax(-1).to(torch::kCPU, torch::kLong).contiguous();
    const int64_t* next_ids = next.data_ptr<int64_t>();
    bool all_ended = true;
    for (int64_t r = 0; r < rows; ++r) {
      Answer& a = answers_[r];
      if (a.ended) continue;
      ++a.forwards;
      const auto token = static_cast<int32_t>(next_ids[r]);
      if (tokenizer_->IsEos(token)) {
        a.ended = true;
        continue;
      }
      a.generated.push_back(token);
      a.ended = (!end_of_turn_.empty() && tokenizer_->Piece(token) == end_of_turn_) ||
                a.forwards >= budget_;
      all_ended &= a.ended;
    }
    if (!all_ended) return Result();
    return Result(Scored());
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

std::vector<AnsweredExample> ExampleAnswerer::Scored() const {
  std::vector<AnsweredExample> out;
  for (const Answer& a : answers_) {
    AnsweredExample e;
    e.line = a.row->line;
    e.prediction = Reply(a.generated);
    e.reference = Reply(std::vector<int32_t>(a.row->input_ids.begin() + a.row->response_start,
                                             a.row->input_ids.end()));
    e.scores = Rouge(e.prediction, e.reference);
    e.generated_tokens = a.forwards;
    out.push_back(std::move(e));
  }
  return out;
}

absl::StatusOr<std::optional<AnsweredExample>> AnswerExample(
    const LlamaModel& model, const LoraAdapter& adapter, const Tokenizer& tokenizer,
    const TokenizedExample& row, int64_t max_new_tokens, const std::string& end_of_turn) {
  if (ExampleAnswerer::Budget(model, row, max_new_tokens) <= 0) {
    return std::optional<AnsweredExample>();
  }
  auto answerer = ExampleAnswerer::Start(model, tokenizer, {&row}, max_new_tokens, end_of_turn);
  if (!answerer.ok()) return answerer.status();
  while (true) {
    auto answered = answerer->Advance(adapter);
    if (!answered.ok()) return answered.status();
    if (answered->has_value()) return std::optional<AnsweredExample>((**answered)[0]);
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

absl::Status WriteEvaluationReport(const std::string& output_dir, int64_t step,
                                   const EvalMetrics& loss, size_t held_out,
                                   const AnswerEvaluation& answers, TrainingSummary& summary) {
  std::error_code ec;
  std::filesystem::create_directories(output_dir, ec);  // a write below names a failure
  const std::filesystem::path path = std::filesystem::path(output_dir) / "eval_report.json";
  const std::string text = EvaluationReportJson(step, loss, held_out, answers);
  // It quotes held-out examples: private, as the job's dataset.
  if (auto st = WriteFileAtomically(path.string(), text, kPrivateFile); !st.ok()) return st;
  summary.eval_report_path = path.string();
  summary.eval_loss = loss.loss;
  summary.rouge = answers.mean;
  summary.answered = static_cast<int64_t>(answers.examples.size());
  summary.has_eval_report = true;
  return absl::OkStatus();
}

}  // namespace lorad::engine
