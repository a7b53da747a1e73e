// ChatTemplate: renders a conversation into the prompt text a chat model was trained on. lorad
// has no Jinja engine; it recognises the template family a model's tokenizer_config.json
// carries and renders it in C++, string-for-string what transformers' apply_chat_template gives
// with that family's published Jinja template:
//   llama3   Llama 3 Instruct: bos + <|start_header_id|>role<|end_header_id|>\n\n content.strip()
//            <|eot_id|> per message; generation prompt = the assistant header. A Llama 3.1+
//            template opens every conversation with a system turn "Cutting Knowledge Date: ...\n
//            Today Date: <date>\n\n" + the conversation's first system message (stripped), with
//            the cutoff and the date rule (a fixed date_string, or today's by strftime_now) read
//            from the template
//   chatml   <|im_start|>role\ncontent<|im_end|>\n per message (Qwen2, SmolLM, Hermes...); a
//            model template that writes a fixed system turn when the conversation has none
//            (Qwen2-Instruct's "You are a helpful assistant.") has it rendered the same way
//   llama2   Llama 2 Chat: bos + "[INST] " + user.strip() + " [/INST]" and " " +
//            assistant.strip() + " " + eos; a leading system message goes into the first user
//            message as "<<SYS>>\n...\n<</SYS>>\n\n"; roles must alternate
//   mistral  Mistral Instruct v0.2: bos + " [INST] user [/INST]" + " assistant</s>"; a leading
//            system message is folded into the first user message; roles must alternate. Other
//            [INST] templates (Mistral v0.1/v0.3 spacing) are not recognised: name one instead
//   alpaca   bos + system (or Alpaca's default preamble) + "### Instruction:\n...\n\n" +
//            "### Response:\n..." + eos + "\n\n"
// The rendered text already holds the BOS token where the family writes one, so it is encoded
// with Tokenizer::Encode(text, /*add_special_tokens=*/false), as apply_chat_template(tokenize=True)
// does; except alpaca's (ForEncoding).
//
// Torch-free: the server renders chats. Immutable once built; thread-safe.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace lorad::engine {

class Tokenizer;

struct ChatMessage {
  std::string role;  // system, user or assistant
  std::string content;
};

class ChatTemplate {
 public:
  // The template called `name` (see KnownNames), writing `bos_token`/`eos_token` where the
  // family does; unset tokens take the family's usual ones (<|begin_of_text|>; <s>, </s>).
  // An unknown name is an error listing the known ones.
  static absl::StatusOr<ChatTemplate> FromName(std::string_view name,
                                               std::optional<std::string> bos_token = {},
                                               std::optional<std::string> eos_token = {});

  // The template of a model folder: recognised from tokenizer_config.json's chat_template (or
  // chat_template.jinja), with the folder's BOS/EOS tokens. A non-empty `override_name` picks the
  // template by name instead. Errors name the file and list the known templates.
  static absl::StatusOr<ChatTemplate> FromTokenizerConfig(const std::string& folder,
                                                          std::string_view override_name = "");

  // The family of a Jinja chat template, from the markers it writes; nullopt if unrecognised.
  static std::optional<std::string> Recognize(std::string_view jinja);

  static const std::vector<std::string>& KnownNames();

  // The Jinja template the family's models publish, which lorad renders string for string
  // (tests/parity/reference_chat_templates.py), for a model folder that must carry it (a merged
  // export of a job trained on a family by name); "" for an unknown name.
  static std::string_view PublishedJinja(std::string_view name);
  // Whether this is the model folder's own template (FromTokenizerConfig without a name), not a
  // family named by a request, a job or the operator.
  bool from_model_folder() const { return from_model_jinja_; }

  // The prompt for `messages`; with add_generation_prompt it ends where the assistant's reply
  // starts (mistral's template adds nothing). Errors: an empty conversation, a role other than
  // system/user/assistant, and what the family's template itself refuses (mistral: roles that do
  // not alternate user/assistant after an optional first system message; a system message
  // anywhere but first for mistral and alpaca).
  absl::StatusOr<std::string> Render(const std::vector<ChatMessage>& messages,
                                     bool add_generation_prompt) const;
  // The prompt that continues the last message, an assistant's (a reply prefilled: "Sure, here",
  // or "{" to start JSON): transformers' apply_chat_template(continue_final_message=True), i.e.
  // rendered without a generation prompt and cut where the last message's content ends (and,
  // where the family trims it, with its trailing space). Render's errors, and INVALID_ARGUMENT
  // when the last message is not an assistant's.
  absl::StatusOr<std::string> RenderContinuing(const std::vector<ChatMessage>& messages) const;
  // What a conversation that opens with the assistant renders before its first reply (transformers'
  // apply_chat_template([], add_generation_prompt=True)): training masks it like any prompt.
  std::string AssistantStart() const;

  // This template rendering `date` as its date_string (transformers'
  // apply_chat_template(date_string=...)) instead of its own; templates without a dated system
  // header are unchanged.
  ChatTemplate WithDate(std::string date) const;

  // How a prompt this template rendered becomes tokens, in training and in serving alike: the
  // text encoded as it is (Tokenizer::Encode(text, false)), or, with add_bos,
  // Tokenizer::EncodePrompt(text). An Alpaca template lorad was told to use (by name: a request's
  // template, model.chat_template) is the notebooks' Alpaca prompt, which they (and lorad's
  // trainer, ExampleFormatter::FormatAlpaca) encode through the tokenizer, the BOS added: for a
  // sentencepiece model that differs from the BOS written as text (the space before the first
  // word), so its text loses the BOS and the tokenizer's is added. Every other template's text,
  // a model folder's own Alpaca-like one included (as transformers' apply_chat_template), is
  // encoded as it is.
  struct Encodable {
    std::string text;
    bool add_bos = false;
  };
  Encodable ForEncoding(std::string rendered) const;
  // The token ids of a prompt this template rendered, by ForEncoding's rule.
  std::vector<int32_t> Encode(const Tokenizer& tokenizer, std::string rendered) const;

  const std::string& name() const { return name_; }
  // The text that ends an assistant turn in this family ("<|eot_id|>", "<|im_end|>", or the EOS
  // token): generation of a chat reply stops there.
  std::string end_of_turn() const;
  const std::string& bos_token() const { return bos_token_; }
  const std::string& eos_token() const { return eos_token_; }
  // What the model's own template writes that its family's rendering leaves out (a Llama 3.1+
  // style dated header lorad cannot read the date rule of), for a warning at start-up; "" when
  // nothing known is left out.
  const std::string& unrendered() const { return unrendered_; }

 private:
  enum class Family { kLlama3, kChatMl, kLlama2, kMistral, kAlpaca };
  ChatTemplate(Family family, std::string name, std::string bos, std::string eos)
      : family_(family),
        name_(std::move(name)),
        bos_token_(std::move(bos)),
        eos_token_(std::move(eos)) {}

  // Llama 3.1+: the system turn the template writes before every conversation.
  struct DatedSystemHeader {
    std::string cutoff;        // "December 2023", as the template writes it
    std::string date;          // a fixed date_string ("26 Jul 2024"); "" = today's
    std::string today_format;  // strftime format of today's date ("%d %b %Y")
  };
  static std::optional<DatedSystemHeader> ReadDatedSystemHeader(const std::string& jinja);

  std::string RenderLlama3(const std::vector<ChatMessage>& messages, bool gen) const;
  std::string RenderChatMl(const std::vector<ChatMessage>& messages, bool gen) const;
  absl::StatusOr<std::string> RenderFamily(const std::vector<ChatMessage>& messages,
                                           bool gen) const;
  absl::StatusOr<std::string> RenderLlama2(const std::vector<ChatMessage>& messages) const;
  absl::StatusOr<std::string> RenderMistral(const std::vector<ChatMessage>& messages) const;
  absl::StatusOr<std::string> RenderAlpaca(const std::vector<ChatMessage>& messages,
                                           bool gen) const;

  Family family_;
  std::string name_;
  std::string bos_token_;
  std::string eos_token_;
  std::string default_system_;  // chatml: the system turn's text when a conversation has none
  bool chatml_bos_ =
      false;  // chatml: the model's template writes bos_token first (Hermes on Llama)
  bool from_model_jinja_ = false;  // recognised from the model folder's template, not named
  std::optional<DatedSystemHeader> dated_header_;  // llama3: Llama 3.1+'s
  std::string unrendered_;
};

}  // namespace lorad::engine
