#include "engine/model/bpe_tokenizer.h"

#include <gtest/gtest.h>

#include <thread>

namespace lorad::engine {
namespace {

// A small byte-level tokenizer.json: printable ASCII stands for itself, "Ġ" is the space, plus
// merges that build "hello" and " w".
struct Spec {
  std::string merges = R"([["l", "l"], ["h", "e"], ["he", "ll"], ["hell", "o"], ["Ġ", "w"]])";
  std::string model_extra = "";
  std::string extra_vocab = "";
  std::string normalizer = "null";
  std::string pre_tokenizer = R"({"type": "ByteLevel", "add_prefix_space": false,
                                  "use_regex": true})";
  std::string decoder = R"({"type": "ByteLevel"})";
  std::string post_processor = R"({"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}}],
      "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [0], "tokens": ["<|bos|>"]}}})";

  std::string Json() const {
    std::string vocab = R"("<|bos|>": 0, "Ġ": 1)";
    int id = 2;
    for (char c = 33; c < 127; ++c) {
      std::string s(1, c);
      if (c == '"' || c == '\\') s = "\\" + s;
      vocab += ", \"" + s + "\": " + std::to_string(id++);
    }
    for (const char* t : {"ll", "he", "hell", "hello", "Ġw"}) {
      vocab += ", \"" + std::string(t) + "\": " + std::to_string(id++);
    }
    vocab += extra_vocab;
    return R"({"added_tokens": [{"id": 0, "content": "<|bos|>", "special": true}],
        "normalizer": )" +
           normalizer + R"(, "pre_tokenizer": )" + pre_tokenizer + R"(, "post_processor": )" +
           post_processor + R"(, "decoder": )" + decoder +
           R"(, "model": {"type": "BPE", "vocab": {)" + vocab + R"(}, "merges": )" + merges +
           model_extra + "}}";
  }
};

std::unique_ptr<BpeTokenizer> Parse(const Spec& spec, TokenizerSettings settings = {}) {
  auto t = BpeTokenizer::Parse(spec.Json(), "test/tokenizer.json", settings);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

std::vector<std::string> Pieces(const Tokenizer& t, const std::vector<int32_t>& ids) {
  std::vector<std::string> out;
  for (int32_t id : ids) out.push_back(t.Piece(id));
  return out;
}

TEST(BpeTokenizer, MergesByRankAndDecodesBytes) {
  auto t = Parse(Spec());
  ASSERT_TRUE(t);
  const auto ids = t->Encode("hello world", /*add_special_tokens=*/true);
  EXPECT_EQ(Pieces(*t, ids),
            (std::vector<std::string>{"<|bos|>", "hello", "Ġw", "o", "r", "l", "d"}));
  EXPECT_EQ(t->Decode(ids, /*skip_special_tokens=*/false), "<|bos|>hello world");
  EXPECT_EQ(t->Decode(ids, /*skip_special_tokens=*/true), "hello world");
  EXPECT_EQ(t->TokenBytes(*t->IdOf("Ġw")), " w");
  EXPECT_EQ(t->bos_id(), -1);  // no bos_token named in the settings
}

// Long pieces (a run of text with no split point, as a sentencepiece-style tokenizer.json makes
// of everything between special tokens) are merged but not cached: 1,000 distinct 2 KB prompts
// left 1,000 cache entries (a daemon grew by gigabytes); short ones still are.
TEST(BpeTokenizer, LongPiecesAreEncodedButNotCached) {
  auto t = Parse(Spec());
  ASSERT_TRUE(t);
  for (int i = 0; i < 1000; ++i) {
    // One run of letters (one piece for the byte-level split), distinct for every i.
    const std::string text =
        std::string{static_cast<char>('a' + i % 26), static_cast<char>('a' + i / 26 % 26),
                    static_cast<char>('a' + i / 676)} +
        std::string(2000, 'x');
    const auto ids = t->Encode(text, /*add_special_tokens=*/false);
    ASSERT_EQ(t->Decode(ids, /*skip_special_tokens=*/false), text);
  }
  EXPECT_LE(t->cached_pieces(), 1u);
  t->Encode("hello", false);
  EXPECT_GE(t->cached_pieces(), 1u);
}

TEST(BpeTokenizer, StringAndPairMergesAreTheSame) {
  Spec pairs, strings;
  strings.merges = R"(["l l", "h e", "he ll", "hell o", "Ġ w"])";
  auto a = Parse(pairs), b = Parse(strings);
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->Encode("hello hello well", false), b->Encode("hello hello well", false));
}

TEST(BpeTokenizer, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  Spec spec;
  spec.extra_vocab = R"(, "xyz": 200)";
  auto plain = Parse(spec);
  spec.model_extra = R"(, "ignore_merges": true)";
  auto whole = Parse(spec);
  ASSERT_TRUE(plain && whole);
  EXPECT_EQ(Pieces(*plain, plain->Encode("xyz", false)), (std::vector<std::string>{"x", "y", "z"}));
  EXPECT_EQ(Pieces(*whole, whole->Encode("xyz", false)), (std::vector<std::string>{"xyz"}));
}

// transformers 5 drops tokenizer_config.json's add_bos_token / add_eos_token when tokenizer.json
// exists (the parity case llama3_config_disagrees checks it against transformers).
TEST(BpeTokenizer, AddBosTokenSettingsLeaveThePostProcessorAlone) {
  TokenizerSettings settings;
  settings.bos_token = "<|bos|>";
  settings.eos_token = "!";
  settings.add_bos_token = false;
  settings.add_eos_token = true;
  auto t = Parse(Spec(), settings);
  ASSERT_TRUE(t);
  EXPECT_EQ(Pieces(*t, t->Encode("he", true)), (std::vector<std::string>{"<|bos|>", "he"}));
  EXPECT_EQ(t->bos_id(), 0);
  EXPECT_TRUE(t->IsEos(*t->IdOf("!")));
}

// tokenizer_config.json's added_tokens_decoder saying `special: false` of a token tokenizer.json
// calls special left it a plain token, so its text leaked into generated output; transformers
// still skips it. The config may make a token special, never the reverse.
TEST(BpeTokenizer, TheConfigNeverMakesATokenTheJsonCallsSpecialAPlainOne) {
  TokenizerSettings settings;
  AddedToken plain;
  plain.id = 0;
  plain.content = "<|bos|>";
  plain.special = false;
  AddedToken marked;
  marked.id = *Parse(Spec())->IdOf("!");
  marked.content = "!";
  marked.special = true;
  settings.added_tokens = {plain, marked};
  auto t = Parse(Spec(), settings);
  ASSERT_TRUE(t);
  EXPECT_TRUE(t->IsSpecial(0));
  EXPECT_TRUE(t->IsSpecial(marked.id));
  EXPECT_EQ(t->Decode({0, *t->IdOf("he"), marked.id}, /*skip_special_tokens=*/true), "he");
}

TEST(BpeTokenizer, BytesOutsideTheVocabularyAreDroppedNotFatal) {
  auto t = Parse(Spec());
  ASSERT_TRUE(t);
  EXPECT_EQ(Pieces(*t, t->Encode("é!", false)), (std::vector<std::string>{"!"}));
  EXPECT_EQ(t->Decode({-1, 99999}, false), "");
}

TEST(BpeTokenizer, UnsupportedShapesNameTheField) {
  struct Case {
    std::string field;
    Spec spec;
  };
  std::vector<Case> cases(4);
  cases[0] = {"pre_tokenizer.replacement", Spec()};
  cases[0].spec.pre_tokenizer = R"({"type": "Metaspace", "replacement": "_"})";
  cases[1] = {"normalizer.type", Spec()};
  cases[1].spec.normalizer = R"({"type": "Lowercase"})";
  cases[2] = {"decoder.type", Spec()};
  cases[2].spec.decoder = R"({"type": "WordPiece"})";
  cases[3] = {"pre_tokenizer.behavior", Spec()};
  cases[3].spec.pre_tokenizer = R"({"type": "Split", "pattern": {"Regex": "a"},
                                    "behavior": "Removed"})";
  for (const Case& c : cases) {
    auto t = BpeTokenizer::Parse(c.spec.Json(), "test/tokenizer.json", {});
    ASSERT_FALSE(t.ok()) << c.field;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kUnimplemented) << t.status();
    EXPECT_NE(t.status().message().find("test/tokenizer.json"), std::string::npos);
    EXPECT_NE(t.status().message().find(c.field), std::string::npos) << t.status();
  }
}

TEST(BpeTokenizer, BrokenFilesAreInvalidArguments) {
  Spec bad_merge;
  bad_merge.merges = R"([["q", "qq"]])";
  auto merge = BpeTokenizer::Parse(bad_merge.Json(), "t.json", {});
  ASSERT_FALSE(merge.ok());
  EXPECT_NE(merge.status().message().find("model.merges[0]"), std::string::npos);
  EXPECT_FALSE(BpeTokenizer::Parse("{not json", "t.json", {}).ok());
  EXPECT_FALSE(BpeTokenizer::Parse(R"({"model": {"vocab": []}})", "t.json", {}).ok());
  EXPECT_FALSE(BpeTokenizer::Parse(R"({"model": 3})", "t.json", {}).ok());
}

TEST(BpeTokenizer, ConcurrentEncodesAgree) {
  auto t = Parse(Spec());
  ASSERT_TRUE(t);
  const std::string text = "hello well hell, world! hello again";
  const auto expected = t->Encode(text, true);
  std::vector<std::thread> threads;
  std::vector<int> same(4, 0);
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      bool ok = true;
      for (int k = 0; k < 200; ++k) ok = ok && t->Encode(text, true) == expected;
      same[i] = ok;
    });
  }
  for (auto& th : threads) th.join();
  for (int ok : same) EXPECT_TRUE(ok);
}

}  // namespace
}  // namespace lorad::engine
