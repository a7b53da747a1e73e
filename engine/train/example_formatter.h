// ExampleFormatter: turns one dataset Example into the token ids and labels the trainer learns
// from. torch-free. The same rules are written out in Python in
// tests/parity/reference_trainer_format.py, and the parity test holds the two equal.
//
// Text, per template (TrainingDataConfig::template_name):
//   alpaca  Stanford Alpaca's prompts (Unsloth's notebooks use the with-input one, also with an
//           empty input; lorad, as Stanford's and TRL's Alpaca examples, the no-input one then):
//             "Below is an instruction that describes a task[, paired with an input that provides
//             further context]. Write a response that appropriately completes the request.\n\n"
//             "### Instruction:\n{instruction}\n\n" ["### Input:\n{input}\n\n"] "### Response:\n"
//           followed by the response. Non-Alpaca records use their user message as the
//           instruction (one user and one assistant message, optionally a system one, which the
//           template has no place for and drops).
//   raw     prompt + response, nothing between (TRL's prompt-completion concatenation).
//   chat    the model's chat template (or a family by name: chatml, llama3, llama2, mistral),
//           every turn.
//           "The model's" is the one the operator named (model.chat_template, so training and
//           serving agree), else the one its tokenizer_config.json names.
//   auto    alpaca for Alpaca records, chat for other conversations (alpaca when the model has
//           no chat template; an error when it has one lorad does not recognise); text records
//           are always their text.
// Tokens:
//   alpaca/raw: ids = Encode(prompt + response, add_special_tokens=true); the prompt part is the
//     longest common prefix of ids and Encode(prompt, true) (TRL's completion mask).
//   chat: ids = Encode(Render(all), false) (the template writes BOS itself); assistant turn i
//     covers [len(Encode(Render(messages[:i], gen=true))), len(Encode(Render(messages[:i+1]))))
//     ("assistant_only_loss": only the assistant's content and end-of-turn markers train); a
//     conversation that opens with the assistant has the template's AssistantStart() before it.
//     Nothing is appended: as in TRL, every assistant turn ends with the template's own end of
//     turn, where a chat reply stops, and a conversation that ends with a user turn has nothing
//     trained after it.
//   text: ids = Encode(text, true), all trained.
//   alpaca, raw and text then get the tokenizer's EOS appended (unless the ids already end with
//   it) and trained, so the model learns to stop. labels = ids, with kNotTrained outside the
//   response when response_only. Finally both are truncated to max_seq_length.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/chat_template.h"
#include "engine/model/tokenizer.h"
#include "engine/train/dataset_reader.h"

namespace lorad::engine {

// A label the loss skips (equal to llama_model.h's kIgnoreLabel, PyTorch's ignore_index).
constexpr int32_t kNotTrained = -100;

struct TokenizedExample {
  std::vector<int32_t> input_ids;  // [T], T <= max_seq_length
  std::vector<int32_t> labels;     // [T], the token itself or kNotTrained
  int64_t line = 0;                // the record's line in its file, for messages
  bool truncated = false;
  // Where the first response starts (the first assistant turn that trains), whatever the loss
  // covers; 0 when there is none (plain text). A held-out example is answered from here.
  int64_t response_start = 0;
  // A packed row whose examples are kept apart (TrainingDataConfig::packing_separate): where its
  // second, third, ... examples start. Empty for a row of one example, or of examples that
  // attend to each other.
  std::vector<int32_t> example_starts;

  // Labels the loss will score: those at positions >= 1 (the first token is never predicted).
  int64_t TrainedTokens() const;
};

struct ExampleFormatterOptions {
  std::string template_name = "auto";
  // The family "auto" and "chat" take as the model's own when not empty (the operator's
  // model.chat_template), instead of the one tokenizer_config.json names.
  std::string model_chat_template;
  bool response_only = true;
  int64_t max_seq_length = 2048;
};

class ExampleFormatter {
 public:
  // `model_folder` supplies the chat template (tokenizer_config.json) and EOS token. Borrows
  // `tokenizer`, which must outlive the formatter. Errors: an unknown template name, "chat" for a
  // model without a chat template, a tokenizer without an EOS token.
  static absl::StatusOr<ExampleFormatter> Create(const Tokenizer& tokenizer,
                                                 const std::string& model_folder,
                                                 const ExampleFormatterOptions& options);

  // Every dataset.template name Create takes: auto, chat, raw and the chat template families
  // (alpaca among them, meaning the Alpaca prompt).
  static std::vector<std::string> TemplateNames();

  // Errors name the record's line and what the template cannot take (e.g. a multi-turn
  // conversation under the alpaca template).
  absl::StatusOr<TokenizedExample> Format(const Example& example) const;

  int32_t eos_id() const { return eos_id_; }
  bool response_only() const { return options_.response_only; }
  // The text that ends a reply under the model's chat template ("<|im_end|>"); empty without
  // one. An evaluation cuts answers there: a model whose end of turn is not its EOS token goes on.
  std::string end_of_turn() const { return chat_ ? chat_->end_of_turn() : ""; }
  // The template family the job's prompts follow where it is not the model folder's own
  // template (dataset.template or model.chat_template named one; "alpaca": Alpaca's prompt, also
  // under auto once every example formatted so far took it), for its merged export to carry; ""
  // where the folder's own is the one trained, or where none is (raw; auto on text records).
  std::string TrainedTemplateNotTheFolders() const;

 private:
  enum class Mode { kAuto, kAlpaca, kRaw, kChat };
  ExampleFormatter(const Tokenizer& tokenizer, ExampleFormatterOptions options)
      : tokenizer_(&tokenizer), options_(std::move(options)) {}

  // prompt + response as one encoded string, the prompt's tokens untrained.
  TokenizedExample FormatPair(const std::string& prompt, const std::string& response) const;
  absl::StatusOr<TokenizedExample> FormatChat(const Example& example) const;
  absl::StatusOr<TokenizedExample> FormatAlpaca(const Example& example) const;
  absl::StatusOr<TokenizedExample> FormatRaw(const Example& example) const;
  void Finish(TokenizedExample& out, bool append_eos) const;

  const Tokenizer* tokenizer_;
  ExampleFormatterOptions options_;
  Mode mode_ = Mode::kAuto;
  std::optional<ChatTemplate> chat_;  // unset when the model has none (auto falls back to alpaca)
  // auto: why the model's template could not be used when it has one lorad does not recognise;
  // a conversation then is an error rather than silently Alpaca-formatted.
  std::string unusable_chat_template_;
  int32_t eos_id_ = -1;
  // How the examples Format returned were laid out (auto takes Alpaca's prompt for Alpaca
  // records, and for conversations on a model without a template). Format runs on one thread.
  mutable bool formatted_alpaca_ = false;
  mutable bool formatted_otherwise_ = false;
};

}  // namespace lorad::engine
