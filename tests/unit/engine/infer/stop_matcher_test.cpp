// StopMatcher: stop strings found across deltas, never partly sent, text before them released.
#include "engine/infer/stop_matcher.h"

#include <gtest/gtest.h>

namespace lorad::engine {
namespace {

TEST(StopMatcherTest, StopStringAcrossDeltasIsNeverSentAndEndsTheText) {
  StopMatcher m({"END", "\n\n"});
  std::string sent;
  sent += m.Add("hello E");
  EXPECT_EQ(sent, "hello ");  // "E" could start "END": held back
  sent += m.Add("N");
  EXPECT_EQ(sent, "hello ");
  EXPECT_FALSE(m.stopped());
  sent += m.Add("D and more");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(sent, "hello ");
  EXPECT_EQ(m.Add("x"), "");
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopMatcherTest, HeldTextThatIsNotAStopIsReleased) {
  StopMatcher m({"END"});
  std::string sent = m.Add("the EN");
  EXPECT_EQ(sent, "the ");
  sent += m.Add("Dless");  // "ENDless" contains END: stop
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(sent, "the ");

  StopMatcher n({"END"});
  sent = n.Add("an E");
  sent += n.Add("lephant");
  EXPECT_EQ(sent, "an Elephant");
  sent += n.Add("E");
  sent += n.Flush();  // the stream ended: the held "E" goes out
  EXPECT_EQ(sent, "an ElephantE");
  EXPECT_FALSE(n.stopped());
}

TEST(StopMatcherTest, MultiByteCharactersAreNotSplit) {
  StopMatcher m({"日本語"});
  std::string sent = m.Add("こんにちは日本");
  EXPECT_EQ(sent, "こんにちは");
  sent += m.Add("人");
  EXPECT_EQ(sent, "こんにちは日本人");
  EXPECT_FALSE(m.stopped());
}

}  // namespace
}  // namespace lorad::engine
