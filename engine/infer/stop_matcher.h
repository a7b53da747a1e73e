// StopMatcher: streams generated text while watching for stop strings, which are matched on text
// (not tokens: a stop string may span tokens, and a token may hold more than it). Text that could
// be the start of a stop string is held back until it is known not to be one, so the client never
// receives part of a stop string; on a match the text before it is released and the rest dropped.
// Input deltas are whole UTF-8 characters (IncrementalDetokenizer) and stop strings start on a
// character, so the released text never splits a character either.
//
// One per sequence; torch-free; not thread-safe.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace lorad::engine {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);

  // Adds decoded text; returns the text that may be sent now. After a match, stopped() is true
  // and further calls return "".
  std::string Add(std::string_view delta);
  // The end of the stream (length, EOS): releases what was held back.
  std::string Flush();
  bool stopped() const { return stopped_; }
  // Whether there is a stop string still to watch for.
  bool watching() const { return !stopped_ && !stops_.empty(); }
  // Whether Add(more) would match a stop string (nothing changes).
  bool WouldStop(std::string_view more) const;

 private:
  std::vector<std::string> stops_;
  std::string held_;  // received, not yet sent
  bool stopped_ = false;
};

}  // namespace lorad::engine
