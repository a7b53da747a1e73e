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

// One held-out example answered greedily a forward at a time: the prompt's, then one per new
// token. The trainer's end advances it once per Step(), so the GPU loop serves between tokens (a
// whole answer at 8B held it for seconds).
class ExampleAnswerer {
 public:
  // nullopt for a row without a prompt to answer (plain text), or without room after its prompt
  // in the model's context.
  static absl::StatusOr<std::optional<ExampleAnswerer>> Start(const LlamaModel& model,
                                                              const Tokenizer& tokenizer,
                                                              const TokenizedExample& row,
                                                              int64_t max_new_tokens,
                                                              std::string end_of_turn);
  // One forward with `adapter`; the scored answer once it has ended, else nullopt.
  absl::StatusOr<std::optional<AnsweredExample>> Advance(const LoraAdapter& adapter);

 private:
  ExampleAnswerer() = default;
  // The reply's text of `ids`: up to the end of turn, decoded, without the end-of-turn markup.
  std::string Reply(std::vector<int32_t> ids) const;
  AnsweredExample Scored() const;

  const LlamaModel* model_ = nullptr;
  const Tokenizer* tokenizer_ = nullptr;
  const TokenizedExample* row_ = nullptr;
  std::string end_of_turn_;
  int64_t budget_ = 0;
  std::unique_ptr<ContiguousKvCache> cache_;
  std::vector<int64_t> next_input_;  // the prompt, then the last generated token
  std::vector<int32_t> generated_;
  int64_t forwards_ = 0;
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

}  // namespace lorad::engine
