#include "engine/model/sentencepiece_tokenizer.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace lorad::engine {
namespace {

std::string ModelPath() {
  return std::string(std::getenv("LORAD_TINY_MODEL")) + "/tokenizer.model";
}

std::unique_ptr<SentencePieceTokenizer> Load(TokenizerSettings settings = {}) {
  if (!settings.add_bos_token) settings.add_bos_token = true;
  auto t = SentencePieceTokenizer::Load(ModelPath(), settings);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

std::vector<std::string> Pieces(const Tokenizer& t, const std::vector<int32_t>& ids) {
  std::vector<std::string> out;
  for (int32_t id : ids) out.push_back(t.Piece(id));
  return out;
}

TEST(SentencePieceTokenizer, WordMarkerOnlyAtTheStartByDefault) {
  auto t = Load();
  ASSERT_TRUE(t);
  // legacy=false: "▁" before the first segment only, never doubled by a leading space, and
  // none after an added token.
  EXPECT_EQ(t->Encode("x", false), t->Encode(" x", false));
  const auto after = Pieces(*t, t->Encode("<|im_start|>x", false));
  ASSERT_EQ(after.size(), 2u);
  EXPECT_EQ(after[1], "x");
}

TEST(SentencePieceTokenizer, LegacyPrefixesEverySegmentAndNoPrefixSpaceNone) {
  TokenizerSettings legacy;
  legacy.legacy = true;
  auto t = Load(legacy);
  ASSERT_TRUE(t);
  const auto pieces = Pieces(*t, t->Encode("<|im_start|>x", false));
  ASSERT_EQ(pieces.size(), 3u);
  EXPECT_EQ(pieces[1], "\xE2\x96\x81");  // "▁"

  TokenizerSettings no_prefix;
  no_prefix.add_prefix_space = false;
  auto n = Load(no_prefix);
  ASSERT_TRUE(n);
  EXPECT_NE(Pieces(*n, n->Encode("x", false)).front().rfind("\xE2\x96\x81", 0), 0u);
  // Without the prefix there is nothing to strip on decode either.
  EXPECT_EQ(n->Decode(n->Encode(" a b", false), false), " a b");
}

TEST(SentencePieceTokenizer, ByteFallbackDecodesWholeCharactersAndReplacesBrokenRuns) {
  auto t = Load();
  ASSERT_TRUE(t);
  const std::string text = "語";  // not in the tiny vocabulary: three byte pieces
  const auto ids = t->Encode(text, false);
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(t->Decode(ids, false), text);
  EXPECT_EQ(t->TokenBytes(ids.back()), "\x9E");
  // A run cut short is not valid UTF-8: one U+FFFD per byte, as transformers decodes it.
  const std::vector<int32_t> cut(ids.end() - 3, ids.end() - 1);
  EXPECT_EQ(t->Decode(cut, false), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(SentencePieceTokenizer, InvalidUtf8InputAndUnknownIdsDoNotCrash) {
  auto t = Load();
  ASSERT_TRUE(t);
  const auto ids = t->Encode("ok \xFF\xFE end", false);
  EXPECT_EQ(t->Decode(ids, false), "ok \xEF\xBF\xBD\xEF\xBF\xBD end");
  EXPECT_EQ(t->Decode({-5, 1 << 30, 2}, true), "");
  EXPECT_EQ(t->TokenBytes(-1), "");
}

TEST(SentencePieceTokenizer, CorruptModelFileIsNamed) {
  const std::string path = ::testing::TempDir() + "/corrupt_tokenizer.model";
  std::ofstream(path, std::ios::binary) << "\x0A\xFF\xFF garbage";
  auto t = SentencePieceTokenizer::Load(path, {});
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find(path), std::string::npos);
  auto missing = SentencePieceTokenizer::Load("/no/such/tokenizer.model", {});
  EXPECT_FALSE(missing.ok());
}

}  // namespace
}  // namespace lorad::engine
