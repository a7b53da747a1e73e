#include "engine/model/utf8.h"

#include <gtest/gtest.h>

namespace lorad::engine {
namespace {

const std::string kFffd = "\xEF\xBF\xBD";

TEST(Utf8, LossyReplacesMaximalIllFormedSubsequences) {
  EXPECT_EQ(Utf8Lossy("ok 日本 😀"), "ok 日本 😀");
  EXPECT_EQ(Utf8Lossy("\xE6\x97"
                      "A"),
            kFffd + "A");                                       // a cut 3-byte sequence: one U+FFFD
  EXPECT_EQ(Utf8Lossy("\xFF\xFE"), kFffd + kFffd);              // never-valid bytes: one each
  EXPECT_EQ(Utf8Lossy("\xED\xA0\x80"), kFffd + kFffd + kFffd);  // a surrogate is ill-formed
  EXPECT_EQ(Utf8Lossy("\xF0\x9F\x98"), kFffd);                  // truncated at the end
  EXPECT_FALSE(IsValidUtf8("\xC0\xAF"));                        // overlong
  EXPECT_TRUE(IsValidUtf8("\xF4\x8F\xBF\xBF"));                 // U+10FFFF
}

TEST(Utf8, ShortenedCutsAtACharacterBoundary) {
  EXPECT_EQ(Utf8Shortened("short", 5), "short");
  EXPECT_EQ(Utf8Shortened("abcdef", 3), "abc...");
  EXPECT_EQ(Utf8Shortened("ab日本", 4), "ab...");  // 日 (3 bytes) would be cut: left out whole
  EXPECT_EQ(Utf8Shortened("ab日本", 5), "ab日...");
}

TEST(Utf8, NonFinalHoldsBackAnIncompleteCharacter) {
  std::string out;
  EXPECT_EQ(AppendUtf8Lossy("ab\xF0\x9F\x98", /*final=*/false, &out), 2u);
  EXPECT_EQ(out, "ab");
  out.clear();
  EXPECT_EQ(AppendUtf8Lossy("\xF0\x9F\x98\x80", false, &out), 4u);
  EXPECT_EQ(out, "😀");
}

TEST(Utf8, PerByteReplacement) {
  std::string out;
  AppendUtf8Lossy(
      "\xE6\x97"
      "A",
      /*final=*/true, &out, /*replacement_per_byte=*/true);
  EXPECT_EQ(out, kFffd + kFffd + "A");
  out.clear();
  AppendUtf8Lossy("\xE6\x97", /*final=*/true, &out, true);
  EXPECT_EQ(out, kFffd + kFffd);
}

TEST(Utf8, CodePointsAndWhitespace) {
  std::string s;
  AppendCodePoint(0x1F600, &s);
  size_t pos = 0;
  EXPECT_EQ(NextCodePoint(s, &pos), 0x1F600u);
  EXPECT_EQ(pos, 4u);
  EXPECT_TRUE(IsUnicodeWhitespace(0x3000));
  EXPECT_TRUE(IsUnicodeWhitespace(0x85));
  EXPECT_FALSE(IsUnicodeWhitespace(0x200B));  // zero-width space is not White_Space
}

}  // namespace
}  // namespace lorad::engine
