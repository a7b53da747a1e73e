#include "engine/model/incremental_detokenizer.h"

#include "engine/model/utf8.h"

namespace lorad::engine {

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens,
                                               bool continues_text)
    : tokenizer_(tokenizer),
      skip_special_tokens_(skip_special_tokens),
      rules_(tokenizer.decode_rules()),
      at_start_(!continues_text) {}

std::string IncrementalDetokenizer::Add(int32_t id) {
  if (id < 0 || id >= tokenizer_.vocab_size()) return "";
  if (skip_special_tokens_ && tokenizer_.IsSpecial(id)) return "";
  if (rules_.replacement_per_byte && ByteFallbackValue(tokenizer_.Piece(id)) >= 0) {
    // transformers' ByteFallback decodes a whole run of byte pieces at once: valid UTF-8 as it
    // is, else one U+FFFD per piece. So the run is held until it ends.
    byte_run_ += tokenizer_.TokenBytes(id);
    ++byte_run_pieces_;
    return "";
  }
  FlushByteRun();
  Push(tokenizer_.TokenBytes(id));
  return Drain(/*final=*/false);
}

void IncrementalDetokenizer::FlushByteRun() {
  if (byte_run_pieces_ == 0) return;
  if (IsValidUtf8(byte_run_)) {
    Push(byte_run_);
  } else {
    std::string replaced;
    for (int i = 0; i < byte_run_pieces_; ++i) replaced += "\xEF\xBF\xBD";
    Push(replaced);
  }
  byte_run_.clear();
  byte_run_pieces_ = 0;
}

void IncrementalDetokenizer::Push(std::string bytes) {
  if (at_start_ && !bytes.empty()) {
    // Decode strips one space from the start of the whole text (sentencepiece's "▁" of the
    // first word); the first byte of the stream is that start.
    if (rules_.strip_leading_space && bytes[0] == ' ') bytes.erase(0, 1);
    at_start_ = false;
  }
  pending_ += bytes;
}

std::string IncrementalDetokenizer::Finish() {
  FlushByteRun();
  return Drain(/*final=*/true);
}

std::string IncrementalDetokenizer::TextIfEndedNow() const {
  IncrementalDetokenizer copy(*this);
  return copy.Finish();
}

bool IncrementalDetokenizer::EndsMidCharacter() const {
  std::string decoded;
  if (AppendUtf8Lossy(pending_, /*final=*/false, &decoded) < pending_.size()) return true;
  // A byte run decodes as a whole: only one valid so far can still become text.
  decoded.clear();
  const size_t complete = AppendUtf8Lossy(byte_run_, /*final=*/false, &decoded);
  return complete < byte_run_.size() &&
         IsValidUtf8(std::string_view(byte_run_).substr(0, complete));
}

std::string IncrementalDetokenizer::Drain(bool final) {
  std::string out;
  pending_.erase(0, AppendUtf8Lossy(pending_, final, &out, rules_.replacement_per_byte));
  return out;
}

}  // namespace lorad::engine
