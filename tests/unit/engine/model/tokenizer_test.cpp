#include "engine/model/tokenizer.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;

std::string TinyModel() { return std::getenv("LORAD_TINY_MODEL"); }

// A copy of the tiny model's tokenizer files in a fresh folder, with some files replaced.
class TokenizerFolder {
 public:
  explicit TokenizerFolder(const std::string& name)
      : path_(fs::path(::testing::TempDir()) / ("tokenizer_test_" + name)) {
    fs::remove_all(path_);
    fs::create_directories(path_);
    for (const char* f : {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                          "generation_config.json"}) {
      fs::copy_file(fs::path(TinyModel()) / f, path_ / f);
    }
  }
  void Write(const std::string& file, const std::string& text) const {
    std::ofstream(path_ / file, std::ios::trunc) << text;
  }
  void Remove(const std::string& file) const { fs::remove(path_ / file); }
  std::string path() const { return path_.string(); }

 private:
  fs::path path_;
};

TEST(LoadTokenizer, TinyModelRoundTripsMultilingualText) {
  auto tok = LoadTokenizer(TinyModel());
  ASSERT_TRUE(tok.ok()) << tok.status();
  for (const std::string text : {"Grüße aus München!", "東京は日本の首都です。", "Emoji: 😀 🚀",
                                 "tabs\tand   spaces", "<|im_start|>user\nhi<|im_end|>"}) {
    const auto ids = (*tok)->Encode(text, /*add_special_tokens=*/false);
    EXPECT_EQ((*tok)->Decode(ids, /*skip_special_tokens=*/false), text);
  }
  // add_bos_token is true in the fixture's tokenizer_config.json.
  const auto ids = (*tok)->Encode("hi", /*add_special_tokens=*/true);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.front(), (*tok)->bos_id());
  EXPECT_EQ((*tok)->bos_id(), 1);
  EXPECT_TRUE((*tok)->IsEos(2));
  EXPECT_EQ((*tok)->IdOf("<|im_start|>"), 3);
  EXPECT_FALSE((*tok)->IdOf("no such piece").has_value());
}

TEST(LoadTokenizer, AddEosTokenAndGenerationConfigEosList) {
  TokenizerFolder folder("eos");
  folder.Write("tokenizer_config.json",
               R"({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "add_bos_token": false, "add_eos_token": true})");
  folder.Write("generation_config.json", R"({"eos_token_id": [2, 4]})");
  auto tok = LoadTokenizer(folder.path());
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto ids = (*tok)->Encode("hi", true);
  ASSERT_FALSE(ids.empty());
  EXPECT_NE(ids.front(), 1);  // no BOS
  EXPECT_EQ(ids.back(), 2);   // EOS
  EXPECT_EQ((*tok)->eos_ids(), (std::set<int32_t>{2, 4}));
}

TEST(LoadTokenizer, MissingFolderAndMissingFilesAreNamed) {
  auto missing = LoadTokenizer("/no/such/folder");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("/no/such/folder"), std::string::npos);

  TokenizerFolder folder("empty");
  folder.Remove("tokenizer.model");
  auto none = LoadTokenizer(folder.path());
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("tokenizer.json"), std::string::npos);
  EXPECT_NE(none.status().message().find("tokenizer.model"), std::string::npos);
}

TEST(LoadTokenizer, MalformedConfigNamesTheFile) {
  TokenizerFolder folder("bad_config");
  folder.Write("tokenizer_config.json", "{not json");
  auto tok = LoadTokenizer(folder.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_NE(tok.status().message().find("tokenizer_config.json"), std::string::npos);

  folder.Write("tokenizer_config.json", R"({"add_bos_token": "yes"})");
  tok = LoadTokenizer(folder.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_NE(tok.status().message().find("add_bos_token"), std::string::npos);
}

TEST(LoadTokenizer, WordPieceTokenizerJsonIsRefusedNamingTheField) {
  TokenizerFolder folder("wordpiece");
  folder.Remove("tokenizer.model");
  folder.Write("tokenizer.json",
               R"({"model": {"type": "WordPiece", "vocab": {"[UNK]": 0}}, "added_tokens": []})");
  auto tok = LoadTokenizer(folder.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_NE(tok.status().message().find("tokenizer.json"), std::string::npos);
  EXPECT_NE(tok.status().message().find("model.type"), std::string::npos);
  EXPECT_NE(tok.status().message().find("WordPiece"), std::string::npos);
}

TEST(LoadTokenizer, SentencePieceStyleTokenizerJsonFallsBackToTokenizerModel) {
  // Llama 2 / Mistral folders ship both files; an older tokenizer.json shape (the word marker
  // put by the normalizer, no pre-tokenizer) is read from tokenizer.model instead.
  TokenizerFolder folder("both");
  folder.Write("tokenizer.json", R"({"model": {"type": "BPE", "vocab": {}, "merges": []},
      "added_tokens": [], "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
      "pre_tokenizer": null,
      "decoder": {"type": "Sequence", "decoders": []}})");
  auto tok = LoadTokenizer(folder.path());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 512);
  // Without it (transformers 5 saves such folders so): a model-folder error saying what to do.
  folder.Remove("tokenizer.model");
  tok = LoadTokenizer(folder.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tok.status().message().find("copy tokenizer.model from the original model folder"),
            std::string::npos)
      << tok.status();
}

// As transformers' generate: generation_config.json's eos list, not config.json's, when it has one.
TEST(LoadTokenizer, GenerationConfigEosListWinsOverConfigJson) {
  TokenizerFolder folder("eos_sources");
  folder.Write("config.json", R"({"eos_token_id": [2, 7, 9]})");
  folder.Write("generation_config.json", R"({"eos_token_id": 2})");
  auto tok = LoadTokenizer(folder.path());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->eos_ids(), (std::set<int32_t>{2}));
  folder.Write("generation_config.json", R"({"max_new_tokens": 5})");
  tok = LoadTokenizer(folder.path());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->eos_ids(), (std::set<int32_t>{2, 7, 9}));
}

TEST(TokenizerSettings, ReadsTokensAsStringsOrAddedTokenObjects) {
  TokenizerFolder folder("settings");
  folder.Write("tokenizer_config.json", R"({"bos_token": {"content": "<s>", "lstrip": false},
      "eos_token": "</s>", "pad_token": null, "legacy": true,
      "added_tokens_decoder": {"3": {"content": "<|im_start|>", "special": true}}})");
  auto s = TokenizerSettings::Load(folder.path());
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->bos_token, "<s>");
  EXPECT_EQ(s->pad_token, "");  // null: explicitly none
  EXPECT_EQ(s->legacy, true);
  ASSERT_EQ(s->added_tokens.size(), 1u);
  EXPECT_TRUE(s->added_tokens[0].special);
  // The re-flagged token is now dropped by skip_special_tokens.
  auto tok = LoadTokenizer(folder.path());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_TRUE((*tok)->IsSpecial(3));
  EXPECT_EQ((*tok)->Decode((*tok)->Encode("<|im_start|>x", false), true), "x");
}

// A hostile or broken tokenizer_config.json is an error naming the entry: an id far beyond any
// vocabulary would size the tokenizer's tables (1.5e9 ids: tens of GB), a flag of the wrong type
// threw.
TEST(TokenizerSettings, AddedTokenIdsBeyondAnyVocabularyAndBadFlagsAreNamed) {
  TokenizerFolder folder("hostile_added");
  folder.Write("tokenizer_config.json",
               R"({"added_tokens_decoder": {"1500000000": {"content": "<x>"}}})");
  auto tok = LoadTokenizer(folder.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_NE(tok.status().message().find("added_tokens_decoder['1500000000']"), std::string::npos)
      << tok.status();
  folder.Write("tokenizer_config.json",
               R"({"added_tokens_decoder": {"4294967296": {"content": "<x>"}}})");
  tok = LoadTokenizer(folder.path());
  ASSERT_FALSE(tok.ok()) << "an id above int32 must not wrap to 0";
  folder.Write("tokenizer_config.json",
               R"({"added_tokens_decoder": {"3": {"content": "<x>", "special": "yes"}}})");
  tok = LoadTokenizer(folder.path());
  ASSERT_FALSE(tok.ok());
  EXPECT_NE(tok.status().message().find("added_tokens_decoder['3'].special"), std::string::npos)
      << tok.status();
}

}  // namespace
}  // namespace lorad::engine
