#include "engine/model/added_vocabulary.h"

#include <gtest/gtest.h>

namespace lorad::engine {
namespace {

std::vector<std::pair<std::string, int32_t>> Split(const AddedVocabulary& v,
                                                   std::string_view text) {
  std::vector<std::pair<std::string, int32_t>> out;
  for (const auto& s : v.Split(text)) out.emplace_back(std::string(s.text), s.id);
  return out;
}

TEST(AddedVocabulary, LeftmostLongestMatch) {
  AddedVocabulary v;
  v.Add({10, "<|im", false});
  v.Add({11, "<|im_start|>", true});
  v.Add({12, "<|im_end|>", true});
  EXPECT_EQ(Split(v, "a<|im_start|>b<|imx"),
            (std::vector<std::pair<std::string, int32_t>>{
                {"a", -1}, {"<|im_start|>", 11}, {"b", -1}, {"<|im", 10}, {"x", -1}}));
  const auto segments = v.Split("xy<|im_end|>");
  ASSERT_EQ(segments.size(), 2u);
  EXPECT_EQ(segments[1].offset, 2u);
  EXPECT_TRUE(v.IsSpecial(11));
  EXPECT_FALSE(v.IsSpecial(10));
  EXPECT_EQ(v.IdOf("<|im_end|>"), 12);
  EXPECT_EQ(v.max_id(), 12);
}

TEST(AddedVocabulary, StripFlagsSwallowNeighbouringWhitespace) {
  AddedVocabulary v;
  AddedToken mask{5, "<mask>", true};
  mask.lstrip = true;
  mask.rstrip = true;
  v.Add(mask);
  EXPECT_EQ(Split(v, "a  <mask>  b"), (std::vector<std::pair<std::string, int32_t>>{
                                          {"a", -1}, {"  <mask>  ", 5}, {"b", -1}}));
}

TEST(AddedVocabulary, SingleWordTokensDoNotMatchInsideWords) {
  AddedVocabulary v;
  AddedToken word{7, "cat", false};
  word.single_word = true;
  v.Add(word);
  EXPECT_EQ(Split(v, "concatenate cat"),
            (std::vector<std::pair<std::string, int32_t>>{{"concatenate ", -1}, {"cat", 7}}));
}

}  // namespace
}  // namespace lorad::engine
