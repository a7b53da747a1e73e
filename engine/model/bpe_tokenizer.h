// BpeTokenizer: a Hugging Face tokenizer.json with a BPE model, encoding and decoding as the
// `tokenizers` library does, in one of two shapes:
//   byte-level (Llama 3, Qwen2, SmolLM, GPT-2): added tokens split out first -> normalizer (none
//   or NFC) -> pre-tokenizer steps (Split regex, Digits, ByteLevel) -> each piece's bytes mapped
//   to GPT-2's byte alphabet -> BPE merges by rank -> post-processor (BOS/EOS from
//   TemplateProcessing, or add_bos_token/add_eos_token);
//   sentencepiece-style (Llama 2, Mistral, TinyLlama as transformers 5 saves them): added tokens
//   split out -> Metaspace (" " becomes "▁", "▁" put in front of the text) -> BPE over characters,
//   a character missing from the vocabulary as its <0xXX> byte tokens (byte fallback) -> the
//   same post-processor; decoding turns "▁" back into spaces, byte tokens into bytes and drops
//   the first leading space.
// Shapes outside those (WordPiece or Unigram models, other normalizers or decoders) are refused
// with kUnimplemented naming the file and field; LoadTokenizer then falls back to a
// tokenizer.model when the folder has one.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/added_vocabulary.h"
#include "engine/model/split_regex.h"
#include "engine/model/tokenizer.h"

namespace lorad::engine {

class BpeTokenizer final : public Tokenizer {
 public:
  // Reads and parses `json_path` (a tokenizer.json).
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> Load(const std::string& json_path,
                                                            const TokenizerSettings& settings);
  // Parses tokenizer.json text; `source` names the file in errors.
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> Parse(const std::string& json_text,
                                                             const std::string& source,
                                                             const TokenizerSettings& settings);
  // The special tokens `json_path`'s post_processor puts before and after a text (none without
  // one), for a tokenizer.json lorad does not otherwise read (one beside tokenizer.model).
  static absl::Status ReadPostProcessor(const std::string& json_path, std::vector<int32_t>* prefix,
                                        std::vector<int32_t>* suffix);

  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const override;
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override;
  std::string TokenBytes(int32_t id) const override;
  std::string Piece(int32_t id) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }
  std::optional<int32_t> IdOf(std::string_view piece) const override;
  bool IsSpecial(int32_t id) const override { return added_.IsSpecial(id); }
  DecodeRules decode_rules() const override;
  // Pieces in the merge cache now (tests).
  size_t cached_pieces() const;

  // One pre-tokenizer step, applied to every piece the previous steps produced.
  struct PreTokenizerStep {
    enum class Kind { kSplit, kByteLevelPrefix };
    Kind kind = Kind::kSplit;
    std::unique_ptr<SplitRegex> regex;  // kSplit: isolates each match
  };
  // A merge: the pair's rank (lower merges first) and the id of the merged token.
  struct Merge {
    int32_t rank = 0;
    int32_t id = 0;
  };

 private:
  BpeTokenizer() = default;
  friend class BpeTokenizerParser;

  std::vector<std::string> PreTokenize(std::string_view text) const;
  // Ids for one pre-tokenized piece (raw bytes), through the cache.
  void EncodePiece(const std::string& piece, std::vector<int32_t>* ids) const;
  std::vector<int32_t> MergePiece(const std::string& piece) const;
  // Sentencepiece-style: one text run between added tokens (`at_start`: it opens the input).
  void EncodeMetaspace(const std::string& text, bool at_start, std::vector<int32_t>* ids) const;

  AddedVocabulary added_;
  std::unordered_map<std::string, int32_t> vocab_;  // byte-level string -> id
  std::vector<std::string> pieces_;                 // [vocab_size] id -> vocabulary string
  std::vector<std::string> token_bytes_;            // [vocab_size] id -> raw bytes
  std::unordered_map<uint64_t, Merge> merges_;      // (left id << 32 | right id) -> merge
  int32_t byte_ids_[256];                           // id of each byte's one-character token
  bool ignore_merges_ = false;  // a piece that is itself a token is not merged (Llama 3)
  bool byte_fallback_ = false;
  // Sentencepiece-style: symbols are characters and the word marker is "▁" (Metaspace).
  bool metaspace_ = false;
  enum class Prepend { kAlways, kFirst, kNever };
  Prepend prepend_ = Prepend::kAlways;  // where "▁" goes in front (first: the text's start only)
  bool metaspace_split_ = true;         // pieces start at each "▁"
  bool strip_leading_space_ = false;    // the decoder drops the decoded text's first space
  std::vector<int16_t> byte_value_;     // [vocab_size] the byte of a <0xXX> token, else -1
  int32_t fallback_ids_[256];           // the <0xXX> token of each byte, or -1
  int32_t unk_id_ = -1;
  bool fuse_unk_ = false;
  bool nfc_ = false;
  std::vector<PreTokenizerStep> pre_tokenizer_;

  // Pieces recur (" the"), so their merges are cached. Bounded: cleared when full, and only
  // pieces up to kMaxCachedPieceBytes (as Hugging Face's BPE caches only short words): a
  // sentencepiece-style tokenizer.json (split false) makes a whole run of text between special
  // tokens one piece, and every distinct 20 KB prompt cached grew the daemon by gigabytes.
  static constexpr size_t kCacheCapacity = 1 << 16;
  static constexpr size_t kMaxCachedPieceBytes = 256;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace lorad::engine
