// SentencePieceTokenizer: a sentencepiece tokenizer.model (Llama 2, Mistral, TinyLlama) wrapped to
// behave exactly like transformers 5's LlamaTokenizer for the same folder:
//  - added tokens (<s>, </s>, user-defined symbols, tokenizer_config's added_tokens_decoder) are
//    split out of the text first and the text between them is encoded on its own;
//  - the word-start marker "▁" is prepended per add_prefix_space/legacy: to the segment at the
//    start of the text only (legacy=false, the default), to every segment (legacy=true) or never
//    (add_prefix_space=false), and never doubled when the text already starts with a space;
//  - no sentencepiece normalization beyond ' ' -> '▁' (transformers sets no normalizer);
//  - Decode follows the Replace("▁", " ") / ByteFallback / Fuse / Strip decoder chain.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/added_vocabulary.h"
#include "engine/model/sentencepiece_model.h"
#include "engine/model/tokenizer.h"

namespace lorad::engine {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Loads `model_path` (a tokenizer.model); errors name the file.
  static absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> Load(
      const std::string& model_path, const TokenizerSettings& settings);

  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const override;
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override;
  std::string TokenBytes(int32_t id) const override;
  std::string Piece(int32_t id) const override;
  int32_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> IdOf(std::string_view piece) const override;
  bool IsSpecial(int32_t id) const override { return added_.IsSpecial(id); }
  DecodeRules decode_rules() const override;

 private:
  SentencePieceTokenizer() = default;
  void EncodeSegment(std::string_view text, bool prepend_marker, std::vector<int32_t>* ids) const;

  enum class Prepend { kFirst, kAlways, kNever };

  SentencePieceModel model_;
  AddedVocabulary added_;
  std::vector<std::string> pieces_;  // [vocab_size] vocabulary strings, added tokens included
  std::vector<int16_t> byte_value_;  // [vocab_size] the byte of a <0xNN> piece, else -1
  std::unordered_map<std::string, int32_t> piece_ids_;
  int32_t vocab_size_ = 0;
  Prepend prepend_ = Prepend::kFirst;
  bool strip_leading_space_ = true;
};

}  // namespace lorad::engine
