// IncrementalDetokenizer: turns generated token ids, fed one at a time, into text deltas for
// streaming. The deltas concatenate to tokenizer.Decode(all ids, skip_special_tokens), and a
// delta never ends inside a UTF-8 sequence: bytes of a character split across tokens
// (sentencepiece <0xE6><0x97><0xA5>, byte-level BPE tokens holding part of a character) are held
// back until the character is complete. The sentencepiece leading-space rule applies to the
// first character of the whole stream, as in Decode, unless the stream continues a text (a
// generation continues its prompt: its first word keeps its space, so prompt + text reads as
// the whole, as vLLM and OpenAI's API return it).
//
// One instance per sequence; not thread-safe (the GPU loop owns it). The tokenizer must outlive
// it.
//
// Ill-formed UTF-8 (a model emitting bytes that never complete a character) becomes U+FFFD as
// Decode does: for byte-level BPE as soon as it is known to be ill-formed (from_utf8_lossy); for
// sentencepiece byte fallback, a run of <0xXX> pieces is held until it ends and then becomes its
// text if it is valid UTF-8, else one U+FFFD per piece (transformers' ByteFallback decoder).
#pragma once

#include <cstdint>
#include <string>

#include "engine/model/tokenizer.h"

namespace lorad::engine {

class IncrementalDetokenizer {
 public:
  IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens,
                         bool continues_text = false);

  // Adds one token; returns the text that is now final (often empty while a character is
  // incomplete).
  std::string Add(int32_t id);

  // The end of the sequence: returns what was held back, an incomplete character as U+FFFD.
  std::string Finish();

  // Bytes held back, waiting for the rest of a character or the end of a byte-piece run.
  size_t pending_bytes() const { return pending_.size() + byte_run_.size(); }

  // What Finish() would return if the sequence ended now, without ending it: a stop string may
  // already be complete in text that is held back only because more bytes could follow.
  std::string TextIfEndedNow() const;

  // Whether the held-back bytes end in a character that more bytes could still complete (a
  // character split across tokens): ending now would make it U+FFFD, which a stop string holding
  // U+FFFD must not match, as the text may never hold it.
  bool EndsMidCharacter() const;

 private:
  std::string Drain(bool final);
  void FlushByteRun();
  void Push(std::string bytes);  // applies the leading-space rule, then holds in pending_

  const Tokenizer& tokenizer_;
  const bool skip_special_tokens_;
  const DecodeRules rules_;
  bool at_start_ = true;  // nothing produced yet (for the leading-space rule)
  std::string pending_;
  std::string byte_run_;  // bytes of consecutive byte-fallback pieces not yet decoded
  int byte_run_pieces_ = 0;
};

}  // namespace lorad::engine
