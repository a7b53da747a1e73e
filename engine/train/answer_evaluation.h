// EvaluateAnswers: the held-out part of a training job's evaluation report. For each held-out
// example, the model with the adapter answers the example's prompt greedily (until EOS or a
// length limit), and the answer is scored against the example's reference response with
// ROUGE-1/2/L (rouge.h). The trainer adds the validation loss and writes it all as
// <output_dir>/eval_report.json.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/lora/lora_adapter.h"
#include "engine/model/contiguous_kv_cache.h"
#include "engine/model/llama_model.h"
#include "engine/model/tokenizer.h"
#include "engine/train/example_formatter.h"
#include "engine/train/rouge.h"
#include "engine/train/training_event.h"

namespace lorad::engine {

struct AnsweredExample {
  int64_t line = 0;  // the record's line in its dataset file
  std::string prediction;
  std::string reference;
  RougeScores scores;
  // Tokens the model generated, its end (EOS or end of turn) included: one forward each. At the
  // length limit the answer was cut there.
  int64_t generated_tokens = 0;
};

struct AnswerEvaluation {
  std::vector<AnsweredExample> examples;
  RougeScores mean;  // the mean of each F-measure over the examples

  void Add(AnsweredExample example);

 private:
  RougeScores sum_;
};

// Held-out examples answered greedily together, a forward at a time: their prompts in one padded
// forward, then a token of every unfinished answer per forward. The trainer's end advances it
// once per Step(), so the GPU loop serves between forwards (a whole answer at 8B held it for
// seconds), and answers a group of rows at once (a forward costs about the same for one row as
// for several).
class ExampleAnswerer {
 public:
  // The tokens `row` may generate: max_new_tokens, or less where its prompt leaves less room in
  // the model's context; 0 when it cannot be answered (no prompt, as plain text, or no room).
  static int64_t Budget(const LlamaModel& model, const TokenizedExample& row,
                        int64_t max_new_tokens);
  // The next group of `rows` to answer together, from rows[*next] on (*next moves past it, and
  // past rows that cannot be answered): at most `max_rows`, while rows x (the longest prompt +
  // max_new_tokens) stays within `max_tokens` (one row at least); a row whose context leaves
  // less than max_new_tokens goes alone. Empty when no row is left.
  static std::vector<const TokenizedExample*> NextGroup(const LlamaModel& model,
                                                        const std::vector<TokenizedExample>& rows,
                                                        size_t* next, int64_t max_rows,
                                                        int64_t max_new_tokens, int64_t max_tokens);
  // `rows` (one or more, each with a Budget > 0, and the same one when there are several) must
  // outlive the answerer.
  static absl::StatusOr<ExampleAnswerer> Start(const LlamaModel& model, const Tokenizer& tokenizer,
                                               std::vector<const TokenizedExample*> rows,
                                               int64_t max_new_tokens, std::string end_of_turn);
  // One forward with `adapter`; once every answer has ended, them all scored, in the rows' order.
  absl::StatusOr<std::optional<std::vector<AnsweredExample>>> Advance(const LoraAdapter& adapter);

 private:
  ExampleAnswerer() = default;
  // The reply's text of `ids`: up to the end of turn, decoded, without the end-of-turn markup.
  std::string Reply(std::vector<int32_t> ids) const;
  std::vector<AnsweredExample> Scored() const;

  struct Answer {
    const TokenizedExample* row = nullptr;
    std::vector<int32_t> generated;
    int64_t forwards = 0;  // while it was unfinished: one token each
    bool ended = false;
  };
  const LlamaModel* model_ = nullptr;
  const Tokenizer* tokenizer_ = nullptr;
  std::string end_of_turn_;
  int64_t budget_ = 0;
  std::vector<Answer> answers_;
  std::unique_ptr<ContiguousKvCache> cache_;
  bool prefilled_ = false;
};

// One example answered and scored whole (ExampleAnswerer advanced to its end); nullopt for a row
// without a prompt to answer.
absl::StatusOr<std::optional<AnsweredExample>> AnswerExample(
    const LlamaModel& model, const LoraAdapter& adapter, const Tokenizer& tokenizer,
    const TokenizedExample& row, int64_t max_new_tokens, const std::string& end_of_turn);

// Rows are formatted examples: each is answered from its response_start (the prompt before it,
// the reference from it); rows without one (plain text) are skipped. At most `max_examples` are
// answered. A non-empty `end_of_turn` (the chat template's) ends an answer where it appears, and is
// cut from answers and references alike: it is markup, not part of the reply.
absl::StatusOr<AnswerEvaluation> EvaluateAnswers(const LlamaModel& model,
                                                 const LoraAdapter& adapter,
                                                 const Tokenizer& tokenizer,
                                                 const std::vector<TokenizedExample>& rows,
                                                 int64_t max_examples, int64_t max_new_tokens,
                                                 const std::string& end_of_turn = "");

// eval_report.json's text: the job's step, the validation loss of the weights it publishes (their
// step), how many examples were held out, and each answered one with its ROUGE scores.
std::string EvaluationReportJson(int64_t step, const EvalMetrics& loss, size_t held_out,
                                 const AnswerEvaluation& answers);

// Writes it as <output_dir>/eval_report.json (atomically) and fills the summary's report fields.
absl::Status WriteEvaluationReport(const std::string& output_dir, int64_t step,
                                   const EvalMetrics& loss, size_t held_out,
                                   const AnswerEvaluation& answers, TrainingSummary& summary);

}  // namespace lorad::engine
