#include "engine/model/incremental_detokenizer.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <random>

#include "engine/model/utf8.h"

namespace lorad::engine {
namespace {

// A tokenizer whose ids 0..255 are single bytes (the hardest case: every multi-byte character
// arrives split) and 256 is a special end token; Decode is byte-level BPE's lossy UTF-8.
class ByteTokenizer : public Tokenizer {
 public:
  std::vector<int32_t> Encode(std::string_view text, bool) const override {
    return std::vector<int32_t>(reinterpret_cast<const uint8_t*>(text.data()),
                                reinterpret_cast<const uint8_t*>(text.data()) + text.size());
  }
  std::string Decode(const std::vector<int32_t>& ids, bool skip) const override {
    std::string bytes;
    for (int32_t id : ids) {
      if (!(skip && IsSpecial(id))) bytes += TokenBytes(id);
    }
    return Utf8Lossy(bytes);
  }
  std::string TokenBytes(int32_t id) const override {
    return id == 256 ? "<end>" : std::string(1, static_cast<char>(id));
  }
  std::string Piece(int32_t id) const override { return TokenBytes(id); }
  int32_t vocab_size() const override { return 257; }
  std::optional<int32_t> IdOf(std::string_view) const override { return std::nullopt; }
  bool IsSpecial(int32_t id) const override { return id == 256; }
  DecodeRules decode_rules() const override { return {}; }
};

const std::vector<std::string> kPieces = {"a",
                                          "the",
                                          " ",
                                          "  ",
                                          "\n",
                                          "\t",
                                          "ü",
                                          "ß",
                                          "é",
                                          "Ж",
                                          "я",
                                          "日",
                                          "本",
                                          "語",
                                          "中",
                                          "😀",
                                          "🚀",
                                          "👍🏽",
                                          "👨‍👩‍👧",
                                          "🇯🇵",
                                          "ع",
                                          "1",
                                          "42",
                                          "'s",
                                          "!",
                                          "—",
                                          "€",
                                          "\u00a0",
                                          "Hello"};

std::string RandomText(std::mt19937* rng) {
  std::uniform_int_distribution<size_t> count(1, 30), pick(0, kPieces.size() - 1);
  std::string text;
  for (size_t n = count(*rng); n > 0; --n) text += kPieces[pick(*rng)];
  return text;
}

// Streams `ids`, checking that no delta carries a broken UTF-8 sequence.
std::string Stream(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip) {
  IncrementalDetokenizer detok(tok, skip);
  std::string text;
  for (int32_t id : ids) {
    const std::string delta = detok.Add(id);
    EXPECT_TRUE(IsValidUtf8(delta));
    text += delta;
  }
  return text + detok.Finish();
}

TEST(IncrementalDetokenizer, RandomMultilingualTextStreamsToTheFullDecode) {
  auto sp = LoadTokenizer(std::getenv("LORAD_TINY_MODEL"));
  ASSERT_TRUE(sp.ok()) << sp.status();
  ByteTokenizer bytes;
  std::mt19937 rng(1234);
  for (int i = 0; i < 200; ++i) {
    const std::string text = RandomText(&rng);
    for (const Tokenizer* tok :
         {static_cast<const Tokenizer*>(sp->get()), static_cast<const Tokenizer*>(&bytes)}) {
      const auto ids = tok->Encode(text, /*add_special_tokens=*/true);
      EXPECT_EQ(Stream(*tok, ids, true), tok->Decode(ids, true)) << text;
      EXPECT_EQ(Stream(*tok, ids, false), tok->Decode(ids, false)) << text;
    }
  }
}

TEST(IncrementalDetokenizer, HoldsBackAByteFallbackRunUntilItEnds) {
  auto tok = LoadTokenizer(std::getenv("LORAD_TINY_MODEL"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto ids = (*tok)->Encode("語", false);  // "▁", <0xE8>, <0xAA>, <0x9E>
  ASSERT_EQ(ids.size(), 4u);
  IncrementalDetokenizer detok(**tok, true);
  EXPECT_EQ(detok.Add(ids[0]), "");  // the leading "▁" is stripped, as Decode does
  // transformers decodes a run of byte pieces as a whole (ByteFallback): the run is held until
  // a piece that is not a byte, or the end.
  EXPECT_EQ(detok.Add(ids[1]), "");
  EXPECT_EQ(detok.Add(ids[2]), "");
  EXPECT_EQ(detok.Add(ids[3]), "");
  EXPECT_EQ(detok.Finish(), "語");

  IncrementalDetokenizer again(**tok, true);
  for (int32_t id : ids) again.Add(id);
  const auto a = (*tok)->Encode(" a", false);
  std::string tail;
  for (int32_t id : a) tail += again.Add(id);
  EXPECT_EQ(tail, "語 a");
}

TEST(IncrementalDetokenizer, AnIllFormedByteRunIsOneReplacementPerPieceAsTransformersDecodes) {
  auto tok = LoadTokenizer(std::getenv("LORAD_TINY_MODEL"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  // "A" then the first two bytes of "語" and no third: ill-formed as a run.
  const auto lead = (*tok)->Encode("語", false);
  std::vector<int32_t> ids = {*(*tok)->IdOf("<0x41>"), lead[1], lead[2]};
  IncrementalDetokenizer detok(**tok, true);
  std::string text;
  for (int32_t id : ids) text += detok.Add(id);
  text += detok.Finish();
  EXPECT_EQ(text, (*tok)->Decode(ids, true));
  EXPECT_EQ(text, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(IncrementalDetokenizer, SaysWhenItsHeldBackBytesEndInACharacterMoreBytesCouldComplete) {
  ByteTokenizer bytes;  // byte-level: held back until the character completes
  IncrementalDetokenizer detok(bytes, true);
  detok.Add('o');
  EXPECT_FALSE(detok.EndsMidCharacter());
  detok.Add(0xF0);
  EXPECT_TRUE(detok.EndsMidCharacter());
  detok.Add(0x9F);
  EXPECT_TRUE(detok.EndsMidCharacter());
  detok.Add('k');  // the character never completed: its U+FFFD is out already
  EXPECT_FALSE(detok.EndsMidCharacter());

  auto tok = LoadTokenizer(std::getenv("LORAD_TINY_MODEL"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto ids = (*tok)->Encode("語", false);  // "▁", <0xE8>, <0xAA>, <0x9E>: a byte run
  IncrementalDetokenizer run(**tok, true);
  run.Add(ids[0]);
  run.Add(ids[1]);
  EXPECT_TRUE(run.EndsMidCharacter());
  run.Add(ids[2]);
  EXPECT_TRUE(run.EndsMidCharacter());
  run.Add(ids[3]);  // complete, still held (the run may go on), and final if it ended here
  EXPECT_GT(run.pending_bytes(), 0u);
  EXPECT_FALSE(run.EndsMidCharacter());
  EXPECT_EQ(run.TextIfEndedNow(), "語");
  // A run ill-formed already decodes as U+FFFD per piece whatever follows.
  IncrementalDetokenizer bad(**tok, true);
  bad.Add(ids[2]);
  EXPECT_FALSE(bad.EndsMidCharacter());
}

TEST(IncrementalDetokenizer, StripsOnlyTheFirstSpaceOfTheStream) {
  auto tok = LoadTokenizer(std::getenv("LORAD_TINY_MODEL"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto marker = (*tok)->IdOf("\xE2\x96\x81");  // "▁"
  ASSERT_TRUE(marker.has_value());
  const std::vector<int32_t> ids = {*marker, *marker, *(*tok)->IdOf("a")};
  EXPECT_EQ((*tok)->Decode(ids, true), " a");
  EXPECT_EQ(Stream(**tok, ids, true), " a");
}

TEST(IncrementalDetokenizer, IncompleteTailBecomesReplacementAtFinish) {
  ByteTokenizer bytes;
  IncrementalDetokenizer detok(bytes, true);
  EXPECT_EQ(detok.Add('o'), "o");
  EXPECT_EQ(detok.Add(0xF0), "");
  EXPECT_EQ(detok.Add(0x9F), "");
  EXPECT_EQ(detok.Add(256), "");  // special, skipped: the character may still complete
  EXPECT_EQ(detok.Add('k'), "\xEF\xBF\xBDk");
  EXPECT_EQ(detok.Add(0xE6), "");
  EXPECT_EQ(detok.Finish(), "\xEF\xBF\xBD");
  EXPECT_EQ(detok.Add(-3), "");  // unknown ids are ignored, like Decode
}

}  // namespace
}  // namespace lorad::engine
