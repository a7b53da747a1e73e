#include "engine/model/split_regex.h"

#include <gtest/gtest.h>

namespace lorad::engine {
namespace {

// Llama 3's pre-tokenizer regex, as its tokenizer.json writes it.
constexpr std::string_view kLlama3 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

std::vector<std::string> Split(const SplitRegex& re, std::string_view text) {
  std::vector<std::string_view> parts;
  re.Split(text, &parts);
  return std::vector<std::string>(parts.begin(), parts.end());
}

TEST(SplitRegex, WhitespaceBeforeAWordGivesItsLastSpaceToTheWord) {
  auto re = SplitRegex::Compile(kLlama3, "test");
  ASSERT_TRUE(re.ok()) << re.status();
  // `\s+(?!\S)`: the run keeps all but the space that starts the next word.
  EXPECT_EQ(Split(*re, "a   b"), (std::vector<std::string>{"a", "  ", " b"}));
  EXPECT_EQ(Split(*re, "a b"), (std::vector<std::string>{"a", " b"}));
  EXPECT_EQ(Split(*re, "end   "), (std::vector<std::string>{"end", "   "}));
  EXPECT_EQ(Split(*re, "x\n\n  y"), (std::vector<std::string>{"x", "\n\n", " ", " y"}));
}

TEST(SplitRegex, UnicodeWhitespaceDigitsAndContractions) {
  auto re = SplitRegex::Compile(kLlama3, "test");
  ASSERT_TRUE(re.ok()) << re.status();
  // U+3000 is whitespace for Oniguruma's \s, not for RE2's.
  EXPECT_EQ(Split(*re, "a\u3000\u3000b"), (std::vector<std::string>{"a", "\u3000", "\u3000b"}));
  EXPECT_EQ(Split(*re, "12345"), (std::vector<std::string>{"123", "45"}));
  EXPECT_EQ(Split(*re, "I'M DON'T"), (std::vector<std::string>{"I", "'M", " DON", "'T"}));
}

TEST(SplitRegex, PiecesAlwaysCoverTheText) {
  auto re = SplitRegex::Compile("b", "test");  // matches leave gaps; gaps are pieces too
  ASSERT_TRUE(re.ok());
  EXPECT_EQ(Split(*re, "abcbb"), (std::vector<std::string>{"a", "b", "c", "b", "b"}));
  auto literal = SplitRegex::Literal("a.b", "test");
  ASSERT_TRUE(literal.ok());
  EXPECT_EQ(Split(*literal, "xa.bya_b"), (std::vector<std::string>{"x", "a.b", "ya_b"}));
}

TEST(SplitRegex, UnsupportedConstructsAreNamed) {
  for (std::string_view p : {"(?<=a)b", "a(?=b)", "a++", "(?>ab)", "x\\s+(?!\\S)"}) {
    auto re = SplitRegex::Compile(p, "tok.json: pre_tokenizer.pattern");
    ASSERT_FALSE(re.ok()) << p;
    EXPECT_EQ(re.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_NE(re.status().message().find("tok.json: pre_tokenizer.pattern"), std::string::npos);
  }
  EXPECT_FALSE(SplitRegex::Compile("(unclosed", "t").ok());
}

}  // namespace
}  // namespace lorad::engine
