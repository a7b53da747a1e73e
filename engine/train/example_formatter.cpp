#include "engine/train/example_formatter.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/train/training_job_config.h"

namespace lorad::engine {
namespace {

constexpr char kAlpacaWithInput[] =
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n";
constexpr char kAlpacaNoInput[] =
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n";

// The record cannot take this template (the caller names the file and line).
absl::Status Unfit(const std::string& what) { return absl::InvalidArgumentError(what); }

// tokenizer(text) for training text that may begin with the BOS written out, as a chat
// template's output does (apply_chat_template(tokenize=False), the text Unsloth's notebooks
// train): the BOS is not added a second time. tokenizer(text) would give two, which a rendered
// chat never gives the model when it serves; Unsloth drops the second too.
std::vector<int32_t> EncodeWithOneBos(const Tokenizer& tokenizer, const std::string& text) {
  std::vector<int32_t> ids = tokenizer.Encode(text, /*add_special_tokens=*/true);
  if (tokenizer.bos_id() >= 0 && ids.size() >= 2 && ids[0] == tokenizer.bos_id() &&
      ids[1] == tokenizer.bos_id()) {
    ids.erase(ids.begin());
  }
  return ids;
}

size_t CommonPrefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t n = 0;
  while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
  return n;
}

// The (instruction, response) of a conversation the single-turn templates can take:
// [system], user, assistant.
absl::StatusOr<std::pair<std::string, std::string>> SingleTurn(const Example& ex,
                                                               const char* template_name) {
  std::vector<const ChatMessage*> turns;
  for (const ChatMessage& m : ex.messages) {
    if (m.role != "system") turns.push_back(&m);
  }
  if (turns.size() != 2 || turns[0]->role != "user" || turns[1]->role != "assistant") {
    return Unfit(absl::StrCat("the ", template_name,
                              " template takes one user and one assistant message; use "
                              "template 'chat' for multi-turn conversations"));
  }
  return std::make_pair(turns[0]->content, turns[1]->content);
}

}  // namespace

int64_t TokenizedExample::TrainedTokens() const {
  int64_t n = 0;
  for (size_t i = 1; i < labels.size(); ++i) n += labels[i] != kNotTrained;
  return n;
}

std::string ExampleFormatter::TrainedTemplateNotTheFolders() const {
  if (mode_ == Mode::kAlpaca ||
      (mode_ == Mode::kAuto && formatted_alpaca_ && !formatted_otherwise_)) {
    return "alpaca";
  }
  return chat_ && !chat_->from_model_folder() ? chat_->name() : "";
}

std::vector<std::string> ExampleFormatter::TemplateNames() {
  std::vector<std::string> names = {"auto", "chat", "raw"};
  for (const std::string& family : ChatTemplate::KnownNames()) names.push_back(family);
  return names;
}

absl::StatusOr<ExampleFormatter> ExampleFormatter::Create(const Tokenizer& tokenizer,
                                                          const std::string& model_folder,
                                                          const ExampleFormatterOptions& options) {
  if (options.max_seq_length < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_seq_length is ", options.max_seq_length, "; it must be >= 2"));
  }
  ExampleFormatter f(tokenizer, options);
  const std::string& name = options.template_name;
  if (name.empty() || name == "auto") {
    f.mode_ = Mode::kAuto;
  } else if (name == "alpaca") {
    f.mode_ = Mode::kAlpaca;
  } else if (name == "raw") {
    f.mode_ = Mode::kRaw;
  } else {
    f.mode_ = Mode::kChat;
  }
  if (f.mode_ == Mode::kAuto || f.mode_ == Mode::kChat) {
    // "auto" and "chat" take the model's own template; any other name picks a family.
    const std::string family = TakesModelsOwnTemplate(name) ? options.model_chat_template : name;
    auto chat = ChatTemplate::FromTokenizerConfig(model_folder, family);
    if (chat.ok()) {
      f.chat_ = *std::move(chat);
    } else if (f.mode_ == Mode::kAuto && !absl::IsNotFound(chat.status())) {
      f.unusable_chat_template_ = std::string(chat.status().message());
    } else if (f.mode_ == Mode::kChat) {
      return absl::InvalidArgumentError(absl::StrCat("dataset.template '", name,
                                                     "': ", chat.status().message(),
                                                     " (other choices: auto, alpaca, raw)"));
    }
  }
  auto settings = TokenizerSettings::Load(model_folder);
  if (!settings.ok()) return settings.status();
  std::optional<int32_t> eos;
  if (settings->eos_token.has_value() && !settings->eos_token->empty()) {
    eos = tokenizer.IdOf(*settings->eos_token);
  }
  if (!eos.has_value() && !tokenizer.eos_ids().empty()) eos = *tokenizer.eos_ids().begin();
  if (!eos.has_value()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the tokenizer in ", model_folder,
        " has no EOS token: training examples must end with one so the model learns to stop"));
  }
  f.eos_id_ = *eos;
  return f;
}

absl::StatusOr<TokenizedExample> ExampleFormatter::Format(const Example& ex) const {
  absl::StatusOr<TokenizedExample> out;
  bool chat = false;
  bool alpaca = false;
  if (ex.format == DatasetFormat::kText) {
    TokenizedExample t;
    t.input_ids = EncodeWithOneBos(*tokenizer_, ex.text);
    t.labels = t.input_ids;
    out = std::move(t);
  } else if (mode_ == Mode::kAuto && ex.format != DatasetFormat::kAlpaca &&
             !unusable_chat_template_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dataset.template 'auto' formats conversations with the model's chat template, which "
        "lorad cannot render (",
        unusable_chat_template_,
        "): set dataset.template to alpaca or raw, or name a family (chatml, llama3, llama2, "
        "mistral)"));
  } else if (mode_ == Mode::kAlpaca ||
             (mode_ == Mode::kAuto && (ex.format == DatasetFormat::kAlpaca || !chat_))) {
    out = FormatAlpaca(ex);
    alpaca = true;
  } else if (mode_ == Mode::kRaw) {
    out = FormatRaw(ex);
  } else {
    out = FormatChat(ex);
    chat = true;
  }
  if (!out.ok()) return out.status();
  (alpaca ? formatted_alpaca_ : formatted_otherwise_) = true;
  out->line = ex.line;
  Finish(*out, /*append_eos=*/!chat);
  return out;
}

TokenizedExample ExampleFormatter::FormatPair(const std::string& prompt,
                                              const std::string& response) const {
  TokenizedExample t;
  t.input_ids = EncodeWithOneBos(*tokenizer_, prompt + response);
  t.labels = t.input_ids;
  const size_t n = CommonPrefix(t.input_ids, EncodeWithOneBos(*tokenizer_, prompt));
  t.response_start = static_cast<int64_t>(n);
  if (options_.response_only) {
    std::fill(t.labels.begin(), t.labels.begin() + static_cast<std::ptrdiff_t>(n), kNotTrained);
  }
  return t;
}

absl::StatusOr<TokenizedExample> ExampleFormatter::FormatAlpaca(const Example& ex) const {
  std::string instruction = ex.instruction;
  std::string input = ex.input;
  std::string response;
  if (ex.format == DatasetFormat::kAlpaca) {
    response = ex.messages.back().content;
  } else {
    auto turn = SingleTurn(ex, "alpaca");
    if (!turn.ok()) return turn.status();
    instruction = turn->first;
    response = turn->second;
  }
  std::string prompt = input.empty() ? kAlpacaNoInput : kAlpacaWithInput;
  absl::StrAppend(&prompt, "### Instruction:\n", instruction, "\n\n");
  if (!input.empty()) absl::StrAppend(&prompt, "### Input:\n", input, "\n\n");
  prompt += "### Response:\n";
  return FormatPair(prompt, response);
}

absl::StatusOr<TokenizedExample> ExampleFormatter::FormatRaw(const Example& ex) const {
  auto turn = SingleTurn(ex, "raw");
  if (!turn.ok()) return turn.status();
  return FormatPair(turn->first, turn->second);
}

absl::StatusOr<TokenizedExample> ExampleFormatter::FormatChat(const Example& ex) const {
  auto render = [&](size_t count, bool gen) -> absl::StatusOr<std::vector<int32_t>> {
    std::vector<ChatMessage> head(ex.messages.begin(),
                                  ex.messages.begin() + static_cast<std::ptrdiff_t>(count));
    auto text = chat_->Render(head, gen);
    if (!text.ok()) return Unfit(std::string(text.status().message()));
    return chat_->Encode(*tokenizer_, *std::move(text));  // as serving encodes it
  };
  TokenizedExample t;
  auto all = render(ex.messages.size(), false);
  if (!all.ok()) return all.status();
  t.input_ids = *std::move(all);
  t.labels.assign(t.input_ids.size(), kNotTrained);
  for (size_t i = 0; i < ex.messages.size(); ++i) {
    if (ex.messages[i].role != "assistant" || i < ex.first_trained_message) continue;
    auto before =
        i == 0 ? chat_->Encode(*tokenizer_, chat_->AssistantStart()) : render(i, /*gen=*/true);
    if (!before.ok()) return before.status();
    const size_t begin = std::min(before->size(), t.input_ids.size());
    // A turn that starts past max_seq_length is cut off by truncation, and so is every later
    // one: rendering them (each a render and encode of the conversation so far) made a record
    // of 2,000 turns take 23 s, quadratic in its turns.
    if (begin >= static_cast<size_t>(options_.max_seq_length)) break;
    if (t.response_start == 0) t.response_start = static_cast<int64_t>(begin);
    if (!options_.response_only) break;  // every label trains: only the first start is needed
    auto upto = render(i + 1, /*gen=*/false);
    if (!upto.ok()) return upto.status();
    const size_t end = std::min(upto->size(), t.input_ids.size());
    for (size_t k = begin; k < end; ++k) t.labels[k] = t.input_ids[k];
  }
  if (!options_.response_only) t.labels = t.input_ids;
  return t;
}

void ExampleFormatter::Finish(TokenizedExample& t, bool append_eos) const {
  if (append_eos && (t.input_ids.empty() || t.input_ids.back() != eos_id_)) {
    t.input_ids.push_back(eos_id_);
    t.labels.push_back(eos_id_);
  }
  const size_t max = static_cast<size_t>(options_.max_seq_length);
  if (t.input_ids.size() > max) {
    t.input_ids.resize(max);
    t.labels.resize(max);
    t.truncated = true;
  }
  if (t.response_start >= static_cast<int64_t>(t.input_ids.size())) t.response_start = 0;
}

}  // namespace lorad::engine
