#include "engine/model/chat_template.h"

#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/json_file.h"
#include "engine/model/tokenizer.h"
#include "engine/model/utf8.h"
#include "nlohmann/json.hpp"
#include "re2/re2.h"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Stanford Alpaca's preamble, written when the conversation has no system message.
constexpr std::string_view kAlpacaPreamble =
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.";

// The errors the families' Jinja templates raise, word for word.
constexpr std::string_view kMistralAlternate =
    "After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...";
constexpr std::string_view kMistralRoles =
    "Only user and assistant roles are supported, with the exception of an initial optional "
    "system message!";
constexpr std::string_view kAlpacaRoles = "Only user and assistant roles are supported!";
constexpr std::string_view kLlama2Alternate =
    "Conversation roles must alternate user/assistant/user/assistant/...";

// meta-llama/Llama-2-7b-chat-hf's chat_template, the one family "llama2" renders.
constexpr std::string_view kLlama2ChatJinja =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
    "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
    "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}";

// meta-llama/Meta-Llama-3-8B-Instruct's chat_template.
constexpr std::string_view kLlama3Jinja =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content "
    "= '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n"
    "\n"
    "'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set "
    "content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
    "add_generation_prompt "
    "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n"
    "\n"
    "' }}{% endif %}";

// The ChatML template (teknium/OpenHermes).
constexpr std::string_view kChatMlJinja =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}";

// mistralai/Mistral-7B-Instruct-v0.2's (the one with an optional system message).
constexpr std::string_view kMistralJinja =
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation "
    "roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + "
    "' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with "
    "the exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n";

// The multi-turn Alpaca template Unsloth ships, with Stanford Alpaca's preamble as the default
// system.
constexpr std::string_view kAlpacaJinja =
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] "
    "+ '\n"
    "\n"
    "' }}{% set loop_messages = messages[1:] %}{% else %}{{ 'Below is an instruction "
    "that describes a task. Write a response that appropriately completes the request.' "
    "+ '\n"
    "\n"
    "' }}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages "
    "%}{% if message['role'] == 'user' %}{{ '### Instruction:\n"
    "' + message['content'] + '\n"
    "\n"
    "' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\n"
    "' + message['content'] + eos_token + '\n"
    "\n"
    "' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') "
    "}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n"
    "' }}{% endif %}";

// The template without the white space between its tags (line breaks and indentation: output
// the published template has none of), to compare templates however they are laid out; white
// space inside a tag, which can be inside a string literal, stays.
std::string WithoutSpace(std::string_view s) {
  std::string out;
  bool in_tag = false;
  for (size_t i = 0; i < s.size(); ++i) {
    if (!in_tag && i + 1 < s.size() && s[i] == '{' && (s[i + 1] == '{' || s[i + 1] == '%')) {
      in_tag = true;
    } else if (in_tag && i > 0 && s[i] == '}' && (s[i - 1] == '}' || s[i - 1] == '%')) {
      in_tag = false;
      out += s[i];
      continue;
    }
    if (!in_tag && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r')) continue;
    out += s[i];
  }
  return out;
}

std::string KnownList() { return absl::StrJoin(ChatTemplate::KnownNames(), ", "); }

// Python's str.strip() (Jinja's `trim`): Unicode White_Space plus the information separators
// U+001C..U+001F, which Python also counts as whitespace.
bool IsPythonSpace(char32_t cp) { return IsUnicodeWhitespace(cp) || (cp >= 0x1C && cp <= 0x1F); }

// str.rstrip()
std::string_view PythonRstrip(std::string_view s) {
  size_t end = 0;  // end of the last non-space character
  for (size_t pos = 0; pos < s.size();) {
    if (!IsPythonSpace(NextCodePoint(s, &pos))) end = pos;
  }
  return s.substr(0, end);
}

std::string PythonStrip(std::string_view s) {
  size_t begin = 0;
  while (begin < s.size()) {
    size_t next = begin;
    if (!IsPythonSpace(NextCodePoint(s, &next))) break;
    begin = next;
  }
  return std::string(PythonRstrip(s.substr(begin)));
}

// The [INST] templates' "messages[0] is system": its text, which they fold into the first user
// turn, or null.
const std::string* LeadingSystem(const std::vector<ChatMessage>& messages) {
  return !messages.empty() && messages[0].role == "system" ? &messages[0].content : nullptr;
}

absl::Status TemplateError(std::string_view name, std::string_view message) {
  return absl::InvalidArgumentError(
      absl::StrCat("chat template '", std::string(name), "': ", std::string(message)));
}

}  // namespace

std::string_view ChatTemplate::PublishedJinja(std::string_view name) {
  if (name == "llama3") return kLlama3Jinja;
  if (name == "chatml") return kChatMlJinja;
  if (name == "llama2") return kLlama2ChatJinja;
  if (name == "mistral") return kMistralJinja;
  if (name == "alpaca") return kAlpacaJinja;
  return "";
}

const std::vector<std::string>& ChatTemplate::KnownNames() {
  static const std::vector<std::string> names = {"llama3", "chatml", "llama2", "mistral", "alpaca"};
  return names;
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromName(std::string_view name,
                                                    std::optional<std::string> bos_token,
                                                    std::optional<std::string> eos_token) {
  if (name == "llama3") {
    return ChatTemplate(Family::kLlama3, "llama3", bos_token.value_or("<|begin_of_text|>"),
                        eos_token.value_or("<|eot_id|>"));
  }
  if (name == "chatml") {
    return ChatTemplate(Family::kChatMl, "chatml", bos_token.value_or(""),
                        eos_token.value_or("<|im_end|>"));
  }
  if (name == "llama2") {
    return ChatTemplate(Family::kLlama2, "llama2", bos_token.value_or("<s>"),
                        eos_token.value_or("</s>"));
  }
  if (name == "mistral") {
    return ChatTemplate(Family::kMistral, "mistral", bos_token.value_or("<s>"),
                        eos_token.value_or("</s>"));
  }
  if (name == "alpaca") {
    return ChatTemplate(Family::kAlpaca, "alpaca", bos_token.value_or("<s>"),
                        eos_token.value_or("</s>"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown chat template '", std::string(name), "' (known: ", KnownList(), ")"));
}

std::optional<std::string> ChatTemplate::Recognize(std::string_view jinja) {
  if (jinja.find("<|start_header_id|>") != std::string_view::npos) return "llama3";
  if (jinja.find("<|im_start|>") != std::string_view::npos) {
    // Phi-4's variant separates the role with <|im_sep|> and no newlines: other tokens.
    if (jinja.find("<|im_sep|>") != std::string_view::npos) return std::nullopt;
    return "chatml";
  }
  // [INST] templates differ in their spacing, which changes the tokens: only the published ones
  // lorad renders are recognised (Llama 2 Chat's, with <<SYS>>; Mistral v0.2's " [INST] ").
  if (jinja.find("<<SYS>>") != std::string_view::npos) {
    // Only Llama 2 Chat's published template, whatever its white space: variants (a default
    // system prompt, system turns later on, a generation prompt) render other text.
    return WithoutSpace(jinja) == WithoutSpace(kLlama2ChatJinja)
               ? std::optional<std::string>("llama2")
               : std::nullopt;
  }
  if (jinja.find("' [INST] '") != std::string_view::npos) return "mistral";
  if (jinja.find("[INST]") != std::string_view::npos) return std::nullopt;
  if (jinja.find("### Instruction") != std::string_view::npos) return "alpaca";
  return std::nullopt;
}

namespace {

// A Jinja string literal's text with its Python escapes (\n, \t, \', ...) read.
std::string UnescapeJinjaString(const std::string& text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '\\' || i + 1 == text.size()) {
      out += text[i];
      continue;
    }
    const char next = text[++i];
    out += next == 'n' ? '\n' : next == 't' ? '\t' : next;
  }
  return out;
}

// The fixed system message a ChatML template writes when the conversation opens without one, as
// Qwen2's does: a Jinja string literal '<|im_start|>system\n...<|im_end|>\n' (the conditional
// one around it splices messages[0]['content'] in, so it is not a single literal). "" if none.
std::string DefaultSystemTurn(const std::string& jinja) {
  // The newlines as Jinja escapes ("\\n" in the source) or as themselves.
  static const RE2 kLiteral(
      R"re((['"])<\|im_start\|>system(?:\\n|\n)((?:[^'"\\]|\\.)*?)<\|im_end\|>(?:\\n|\n)['"])re");
  re2::StringPiece input(jinja);
  std::string quote, text;
  if (!RE2::PartialMatch(input, kLiteral, &quote, &text)) return "";
  return UnescapeJinjaString(text);
}

}  // namespace

absl::StatusOr<ChatTemplate> ChatTemplate::FromTokenizerConfig(const std::string& folder,
                                                               std::string_view override_name) {
  absl::StatusOr<TokenizerSettings> settings = TokenizerSettings::Load(folder);
  if (!settings.ok()) return settings.status();
  // A token set to null in the files stays empty: the template then writes nothing there.
  if (!override_name.empty()) {
    return FromName(override_name, settings->bos_token, settings->eos_token);
  }
  const fs::path config_path = fs::path(folder) / "tokenizer_config.json";
  // Newer folders keep the template in a file of its own, which transformers reads in place of
  // the config's field when both are there (the field may be an older template left behind).
  const fs::path jinja_path = fs::path(folder) / "chat_template.jinja";
  std::string jinja;
  {
    std::ifstream jinja_in(jinja_path);
    std::stringstream text;
    if (jinja_in) text << jinja_in.rdbuf();
    jinja = text.str();
  }
  const std::string source = jinja.empty()
                                 ? absl::StrCat(config_path.string(), ": field 'chat_template'")
                                 : jinja_path.string();
  absl::StatusOr<std::optional<json>> config = ReadJsonObjectIfPresent(config_path.string());
  if (!config.ok()) return config.status();
  if (jinja.empty() && config->has_value()) {
    const json chat = (**config).value("chat_template", json());
    if (chat.is_string()) jinja = chat.get<std::string>();
    // A list of named templates: [{"name": "default", "template": "..."}, ...].
    if (chat.is_array()) {
      for (const auto& entry : chat) {
        if (entry.is_object() && entry.value("name", "") == "default" &&
            entry.contains("template") && entry["template"].is_string()) {
          jinja = entry["template"].get<std::string>();
        }
      }
    }
  }
  if (jinja.empty()) {
    return absl::NotFoundError(
        absl::StrCat(config_path.string(),
                     " has no chat_template (and there is no chat_template.jinja): name "
                     "the template to use, one of: ",
                     KnownList()));
  }
  const std::optional<std::string> name = Recognize(jinja);
  if (!name) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, " is not a template lorad recognises (it renders the families ",
                     KnownList(), "); name one of them to use it instead"));
  }
  absl::StatusOr<ChatTemplate> t = FromName(*name, settings->bos_token, settings->eos_token);
  if (!t.ok()) return t;
  t->from_model_jinja_ = true;
  if (t->family_ == Family::kChatMl) {
    t->default_system_ = DefaultSystemTurn(jinja);
    // ChatML on a tokenizer with a BOS (Hermes 2 Pro, Hermes 3 on Llama 3) writes it first.
    static const RE2 kBos(R"re(\{\{-?\s*bos_token\b)re");
    t->chatml_bos_ = RE2::PartialMatch(jinja, kBos);
    // A reply opened with more than the role line (QwQ's '<|im_start|>assistant\n<think>\n'):
    // said at start-up, as the rendering leaves it out.
    static const RE2 kOpening(R"re(<\|im_start\|>assistant(?:\\n|\n)([^'"]+)['"])re");
    std::string opening;
    if (RE2::PartialMatch(jinja, kOpening, &opening)) {
      t->unrendered_ = absl::StrCat(
          "the model's chat template opens the assistant's reply with more than its role line (",
          absl::CHexEscape(UnescapeJinjaString(opening)),
          "), which lorad's chatml rendering leaves out");
    } else if (jinja.find("<think>") != std::string::npos) {
      // Qwen3's: a reasoning block before the last reply (empty when there is none), earlier
      // replies' blocks stripped.
      t->unrendered_ =
          "the model's chat template writes <think> reasoning blocks into assistant replies, "
          "which lorad's chatml rendering leaves out";
    }
  }
  if (t->family_ == Family::kLlama3 && jinja.find("Cutting Knowledge Date") != std::string::npos) {
    t->dated_header_ = ReadDatedSystemHeader(jinja);
    if (!t->dated_header_) {
      t->unrendered_ =
          "the model's chat template also writes a system header with a knowledge cutoff and "
          "a date in a form lorad does not recognise, which lorad's llama3 rendering leaves out";
    }
  }
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Render(const std::vector<ChatMessage>& messages,
                                                 bool add_generation_prompt) const {
  if (messages.empty()) return TemplateError(name_, "the conversation has no messages");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    if (role != "system" && role != "user" && role != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat("messages[", i, "].role: '", role,
                                                     "' is not one of system, user, assistant"));
    }
  }
  return RenderFamily(messages, add_generation_prompt);
}

absl::StatusOr<std::string> ChatTemplate::RenderContinuing(
    const std::vector<ChatMessage>& messages) const {
  if (messages.empty() || messages.back().role != "assistant") {
    return absl::InvalidArgumentError(absl::StrCat(
        "continue_final_message: the last message must be the assistant's reply to continue (it "
        "is ",
        messages.empty() ? "missing" : "a " + messages.back().role + " message",
        "); leave continue_final_message off to have the model answer it"));
  }
  // transformers' own way: a marker after the content, rendered, and the text cut at it. Where
  // the template keeps the marker's trailing space it kept the content as given; where not, it
  // trimmed the content, so its trailing white space goes too.
  constexpr std::string_view kTag = "CONTINUE_FINAL_MESSAGE_TAG ";
  std::vector<ChatMessage> tagged = messages;
  tagged.back().content += kTag;
  auto text = Render(tagged, /*add_generation_prompt=*/false);
  if (!text.ok()) return text.status();
  const size_t at = text->rfind(kTag.substr(0, kTag.size() - 1));
  if (at == std::string::npos) {
    return TemplateError(name_, "the last message does not appear in the rendered conversation");
  }
  if (text->compare(at, kTag.size(), kTag) == 0) return text->substr(0, at);
  return std::string(PythonRstrip(std::string_view(*text).substr(0, at)));
}

std::string ChatTemplate::AssistantStart() const {
  auto text = RenderFamily({}, /*gen=*/true);
  return text.ok() ? *text : bos_token_;
}

absl::StatusOr<std::string> ChatTemplate::RenderFamily(const std::vector<ChatMessage>& messages,
                                                       bool gen) const {
  switch (family_) {
    case Family::kLlama3:
      return RenderLlama3(messages, gen);
    case Family::kChatMl:
      return RenderChatMl(messages, gen);
    case Family::kLlama2:
      return RenderLlama2(messages);
    case Family::kMistral:
      return RenderMistral(messages);
    case Family::kAlpaca:
      return RenderAlpaca(messages, gen);
  }
  return TemplateError(name_, "unknown family");
}

std::string ChatTemplate::end_of_turn() const {
  switch (family_) {
    case Family::kLlama3:
      return "<|eot_id|>";
    case Family::kChatMl:
      return "<|im_end|>";
    case Family::kLlama2:
    case Family::kMistral:
    case Family::kAlpaca:
      break;
  }
  return eos_token_;
}

std::optional<ChatTemplate::DatedSystemHeader> ChatTemplate::ReadDatedSystemHeader(
    const std::string& jinja) {
  // The Jinja source as tokenizer_config.json holds it: string literals with "\n" escapes (or,
  // in a chat_template.jinja file, real newlines).
  static const RE2 kCutoff(R"re(Cutting Knowledge Date: ((?:[^"'\\\n])*)(?:\\n|\n))re");
  static const RE2 kToday(R"re(Today Date: ["']\s*\+\s*date_string)re");
  static const RE2 kFixed(R"re(set\s+date_string\s*=\s*["']([^"'\\]*)["'])re");
  static const RE2 kStrftime(R"re(strftime_now\(\s*["']([^"'\\]*)["']\s*\))re");
  DatedSystemHeader h;
  if (!RE2::PartialMatch(jinja, kCutoff, &h.cutoff) || !RE2::PartialMatch(jinja, kToday)) {
    return std::nullopt;
  }
  // Llama 3.2's templates take today's date when transformers provides strftime_now (it always
  // does), else the fixed one; Llama 3.1's has only the fixed one.
  if (RE2::PartialMatch(jinja, kStrftime, &h.today_format)) return h;
  if (RE2::PartialMatch(jinja, kFixed, &h.date)) return h;
  return std::nullopt;
}

ChatTemplate ChatTemplate::WithDate(std::string date) const {
  ChatTemplate t = *this;
  if (t.dated_header_) {
    t.dated_header_->date = std::move(date);
    t.dated_header_->today_format.clear();
  }
  return t;
}

std::string ChatTemplate::RenderLlama3(const std::vector<ChatMessage>& messages, bool gen) const {
  std::string out = bos_token_;
  size_t first = 0;
  if (dated_header_) {
    std::string date = dated_header_->date;
    if (!dated_header_->today_format.empty()) {  // as Python's datetime.now().strftime(format)
      const std::time_t now = std::time(nullptr);
      std::tm local{};
      localtime_r(&now, &local);
      char buffer[128];
      const size_t n =
          std::strftime(buffer, sizeof buffer, dated_header_->today_format.c_str(), &local);
      date.assign(buffer, n);
    }
    std::string system;
    if (!messages.empty() && messages[0].role == "system") {
      system = PythonStrip(messages[0].content);
      first = 1;
    }
    absl::StrAppend(&out, "<|start_header_id|>system<|end_header_id|>\n\n",
                    "Cutting Knowledge Date: ", dated_header_->cutoff, "\nToday Date: ", date,
                    "\n\n", system, "<|eot_id|>");
  }
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    absl::StrAppend(&out, "<|start_header_id|>", m.role, "<|end_header_id|>\n\n",
                    PythonStrip(m.content), "<|eot_id|>");
  }
  if (gen) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

std::string ChatTemplate::RenderChatMl(const std::vector<ChatMessage>& messages, bool gen) const {
  std::string out = chatml_bos_ ? bos_token_ : "";
  if (!default_system_.empty() && (messages.empty() || messages[0].role != "system")) {
    absl::StrAppend(&out, "<|im_start|>system\n", default_system_, "<|im_end|>\n");
  }
  for (const ChatMessage& m : messages) {
    absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
  }
  if (gen) out += "<|im_start|>assistant\n";
  return out;
}

absl::StatusOr<std::string> ChatTemplate::RenderLlama2(
    const std::vector<ChatMessage>& messages) const {
  const std::string* system = LeadingSystem(messages);
  const size_t first = system != nullptr ? 1 : 0;
  std::string out;
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const size_t index = i - first;
    if ((m.role == "user") != (index % 2 == 0)) return TemplateError(name_, kLlama2Alternate);
    // The system text joins the first message before the strip, as the template concatenates.
    const std::string content =
        index == 0 && system != nullptr
            ? PythonStrip(absl::StrCat("<<SYS>>\n", *system, "\n<</SYS>>\n\n", m.content))
            : PythonStrip(m.content);
    if (m.role == "user") {
      absl::StrAppend(&out, bos_token_, "[INST] ", content, " [/INST]");
    } else if (m.role == "assistant") {
      absl::StrAppend(&out, " ", content, " ", eos_token_);
    }  // a system message later on (at an odd place) writes nothing, as in the template
  }
  return out;
}

absl::StatusOr<std::string> ChatTemplate::RenderMistral(
    const std::vector<ChatMessage>& messages) const {
  const std::string* system = LeadingSystem(messages);
  const size_t first = system != nullptr ? 1 : 0;
  std::string out = bos_token_;
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const size_t index = i - first;
    // The template's own checks, in its order: alternation first, then the role.
    if ((m.role == "user") != (index % 2 == 0)) return TemplateError(name_, kMistralAlternate);
    if (m.role == "user") {
      if (index == 0 && system != nullptr) {
        absl::StrAppend(&out, " [INST] ", *system, "\n\n", m.content, " [/INST]");
      } else {
        absl::StrAppend(&out, " [INST] ", m.content, " [/INST]");
      }
    } else if (m.role == "assistant") {
      absl::StrAppend(&out, " ", m.content, eos_token_);
    } else {
      return TemplateError(name_, kMistralRoles);
    }
  }
  return out;
}

ChatTemplate::Encodable ChatTemplate::ForEncoding(std::string rendered) const {
  if (family_ == Family::kAlpaca && !from_model_jinja_ && !bos_token_.empty() &&
      absl::StartsWith(rendered, bos_token_)) {
    return {rendered.substr(bos_token_.size()), true};
  }
  return {std::move(rendered), false};
}

std::vector<int32_t> ChatTemplate::Encode(const Tokenizer& tokenizer, std::string rendered) const {
  const Encodable e = ForEncoding(std::move(rendered));
  return e.add_bos ? tokenizer.EncodePrompt(e.text) : tokenizer.Encode(e.text, false);
}

absl::StatusOr<std::string> ChatTemplate::RenderAlpaca(const std::vector<ChatMessage>& messages,
                                                       bool gen) const {
  std::string out = bos_token_;
  size_t first = 0;
  if (!messages.empty() && messages[0].role == "system") {
    absl::StrAppend(&out, messages[0].content, "\n\n");
    first = 1;
  } else {
    absl::StrAppend(&out, std::string(kAlpacaPreamble), "\n\n");
  }
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user") {
      absl::StrAppend(&out, "### Instruction:\n", m.content, "\n\n");
    } else if (m.role == "assistant") {
      absl::StrAppend(&out, "### Response:\n", m.content, eos_token_, "\n\n");
    } else {
      return TemplateError(name_, kAlpacaRoles);
    }
  }
  if (gen) out += "### Response:\n";
  return out;
}

}  // namespace lorad::engine
