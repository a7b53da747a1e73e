#include "engine/model/chat_template.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;

const std::vector<ChatMessage> kChat = {{"system", "Be brief."}, {"user", "Hi"}};

fs::path Folder(const std::string& name, const std::string& config) {
  const fs::path dir = fs::path(::testing::TempDir()) / ("chat_template_test_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  if (!config.empty()) std::ofstream(dir / "tokenizer_config.json") << config;
  return dir;
}

TEST(ChatTemplate, TinyModelIsChatMl) {
  auto t = ChatTemplate::FromTokenizerConfig(std::getenv("LORAD_TINY_MODEL"));
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->name(), "chatml");
  auto text = t->Render({{"user", "hi"}}, /*add_generation_prompt=*/true);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, NameOverridesTheFolderTemplateAndKeepsItsTokens) {
  auto t = ChatTemplate::FromTokenizerConfig(std::getenv("LORAD_TINY_MODEL"), "mistral");
  ASSERT_TRUE(t.ok()) << t.status();
  auto text = t->Render(kChat, false);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, "<s> [INST] Be brief.\n\nHi [/INST]");
}

// Alpaca's prompt is encoded as the trainer encodes it (the tokenizer adds the BOS); every
// other family's text is encoded as it is.
TEST(ChatTemplate, AlpacaTextLosesItsBosForTheTokenizerToAdd) {
  auto alpaca = ChatTemplate::FromName("alpaca", "<s>", "</s>");
  ASSERT_TRUE(alpaca.ok()) << alpaca.status();
  auto text = alpaca->Render({{"user", "hi"}}, true);
  ASSERT_TRUE(text.ok());
  ASSERT_EQ(text->rfind("<s>Below is an instruction", 0), 0u) << *text;
  const ChatTemplate::Encodable e = alpaca->ForEncoding(*text);
  EXPECT_EQ(e.text, text->substr(3));
  EXPECT_TRUE(e.add_bos);
  auto llama2 = ChatTemplate::FromName("llama2", "<s>", "</s>");
  ASSERT_TRUE(llama2.ok());
  const ChatTemplate::Encodable as_is = llama2->ForEncoding("<s>[INST] hi [/INST]");
  EXPECT_EQ(as_is.text, "<s>[INST] hi [/INST]");
  EXPECT_FALSE(as_is.add_bos);
}

TEST(ChatTemplate, UnknownNameListsTheKnownOnes) {
  auto t = ChatTemplate::FromName("vicuna");
  ASSERT_FALSE(t.ok());
  for (const std::string& name : ChatTemplate::KnownNames()) {
    EXPECT_NE(t.status().message().find(name), std::string::npos) << t.status();
  }
}

TEST(ChatTemplate, RecognisesFamiliesByTheirMarkers) {
  EXPECT_EQ(ChatTemplate::Recognize("{{ '<|start_header_id|>' + role }}"), "llama3");
  EXPECT_EQ(ChatTemplate::Recognize("{{'<|im_start|>' + message['role']}}"), "chatml");
  EXPECT_EQ(ChatTemplate::Recognize("{{ ' [INST] ' + content }}"), "mistral");
  // Other [INST] spacings render other tokens: not taken for Mistral v0.2's.
  EXPECT_FALSE(ChatTemplate::Recognize("{{ '[INST] ' + content + '[/INST]' }}").has_value());
  // A Llama 2 template with a default system prompt writes text lorad would leave out.
  EXPECT_FALSE(
      ChatTemplate::Recognize("{% set system_message = 'You are helpful' %}{{ '<<SYS>>\\n' }}")
          .has_value());
  EXPECT_EQ(ChatTemplate::Recognize("{{ '### Instruction:\\n' }}"), "alpaca");
  EXPECT_FALSE(ChatTemplate::Recognize("{{ '<start_of_turn>' }}").has_value());
}

TEST(ChatTemplate, RolesAreValidated) {
  for (const std::string& name : ChatTemplate::KnownNames()) {
    auto t = ChatTemplate::FromName(name);
    ASSERT_TRUE(t.ok());
    auto tool = t->Render({{"user", "x"}, {"tool", "y"}}, false);
    ASSERT_FALSE(tool.ok()) << name;
    EXPECT_EQ(tool.status().message().rfind("messages[1].role: 'tool'", 0), 0u) << tool.status();
    EXPECT_FALSE(t->Render({}, true).ok()) << name;
  }
  auto mistral = ChatTemplate::FromName("mistral");
  ASSERT_TRUE(mistral.ok());
  auto twice = mistral->Render({{"user", "a"}, {"user", "b"}}, false);
  ASSERT_FALSE(twice.ok());
  EXPECT_NE(twice.status().message().find("alternate"), std::string::npos);
}

TEST(ChatTemplate, Llama3TrimsContentAndAddsTheAssistantHeader) {
  auto t = ChatTemplate::FromName("llama3");
  ASSERT_TRUE(t.ok());
  auto text = t->Render({{"user", "  hi \n"}}, true);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(ChatTemplate, FolderTemplatesFromListsAndJinjaFiles) {
  const fs::path listed = Folder("list", R"({"bos_token": "<s>", "chat_template": [
      {"name": "tool_use", "template": "{{ '[INST]' }}"},
      {"name": "default", "template": "{{ '<|start_header_id|>' }}"}]})");
  auto a = ChatTemplate::FromTokenizerConfig(listed.string());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->name(), "llama3");
  EXPECT_EQ(a->bos_token(), "<s>");

  const fs::path file = Folder("file", R"({"eos_token": "<|im_end|>"})");
  std::ofstream(file / "chat_template.jinja") << "{{ '<|im_start|>' }}";
  auto b = ChatTemplate::FromTokenizerConfig(file.string());
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->name(), "chatml");

  // Both: the file wins, as in transformers (the config's field may be an older template).
  const fs::path both = Folder("both", R"({"chat_template": "{{ '[INST]' }}"})");
  std::ofstream(both / "chat_template.jinja") << "{{ '<|start_header_id|>' }}";
  auto c = ChatTemplate::FromTokenizerConfig(both.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->name(), "llama3");
  const fs::path unknown = Folder("both-unknown", R"({"chat_template": "{{ '[INST]' }}"})");
  std::ofstream(unknown / "chat_template.jinja") << "{{ '<start_of_turn>' }}";
  auto d = ChatTemplate::FromTokenizerConfig(unknown.string());
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("chat_template.jinja is not a template"), std::string::npos)
      << d.status();
}

// A dated system header lorad cannot read the date rule of is not rendered: the template says so,
// for the start-up warning; a plain Llama 3 template has nothing left out.
TEST(ChatTemplate, LeftOutPartsOfAModelTemplateAreNamed) {
  const fs::path dated = Folder("dated", R"({"chat_template":
      "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"})");
  auto a = ChatTemplate::FromTokenizerConfig(dated.string());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_NE(a->unrendered().find("knowledge cutoff"), std::string::npos);
  const fs::path plain = Folder("plain", R"({"chat_template": "{{ '<|start_header_id|>' }}"})");
  auto b = ChatTemplate::FromTokenizerConfig(plain.string());
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(b->unrendered().empty());
  // QwQ opens the reply with '<think>\n' after the role line: rendered as ChatML without it.
  const fs::path thinking = Folder("thinking", R"({"chat_template":
      "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{{- '<|im_start|>assistant\\n<think>\\n' }}"})");
  auto c = ChatTemplate::FromTokenizerConfig(thinking.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_NE(c->unrendered().find("more than its role line (<think>\\n)"), std::string::npos)
      << c->unrendered();
  // Qwen3's reasoning blocks in the replies themselves.
  const fs::path reasoning = Folder("reasoning", R"({"chat_template":
      "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>' + m['role'] + '\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"})");
  auto d = ChatTemplate::FromTokenizerConfig(reasoning.string());
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_NE(d->unrendered().find("<think> reasoning blocks"), std::string::npos) << d->unrendered();
  // Qwen2's own opening is the role line alone: nothing left out.
  auto tiny = ChatTemplate::FromTokenizerConfig(std::getenv("LORAD_TINY_MODEL"));
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  EXPECT_TRUE(tiny->unrendered().empty()) << tiny->unrendered();
}

TEST(ChatTemplate, MissingOrUnknownFolderTemplatesAreErrorsNamingTheFile) {
  auto none = ChatTemplate::FromTokenizerConfig(Folder("none", R"({"bos_token": "<s>"})").string());
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("tokenizer_config.json"), std::string::npos);
  EXPECT_NE(none.status().message().find("chatml"), std::string::npos);

  // Phi-4's ChatML variant (<|im_sep|> after the role, no newlines) renders other tokens.
  auto phi4 = ChatTemplate::FromTokenizerConfig(
      Folder("phi4", R"({"chat_template": "{{ '<|im_start|>' + m['role'] + '<|im_sep|>' }}"})")
          .string());
  ASSERT_FALSE(phi4.ok());
  EXPECT_NE(phi4.status().message().find("not a template lorad recognises"), std::string::npos)
      << phi4.status();

  auto gemma = ChatTemplate::FromTokenizerConfig(
      Folder("gemma", R"({"chat_template": "{{ '<start_of_turn>' }}"})").string());
  ASSERT_FALSE(gemma.ok());
  EXPECT_NE(gemma.status().message().find("chat_template"), std::string::npos);
}

}  // namespace
}  // namespace lorad::engine
