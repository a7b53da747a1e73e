// Tokenizer: text <-> token ids for a Hugging Face model folder, matching what transformers
// (AutoTokenizer.from_pretrained) produces for the same folder. Torch-free: the server includes
// it to count prompt tokens.
//
// LoadTokenizer picks the implementation:
//   tokenizer.json with a byte-level BPE model (Llama 3, Qwen2, SmolLM)  -> BpeTokenizer
//   tokenizer.model (sentencepiece; Llama 2, Mistral, TinyLlama)          -> SentencePieceTokenizer
// and reads the special-token settings from tokenizer_config.json, special_tokens_map.json,
// generation_config.json and config.json.
//
// Thread safety: a loaded tokenizer is immutable apart from internal caches that lock; every
// method may be called from any thread at the same time.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/added_vocabulary.h"

namespace lorad::engine {

// How Decode turns the tokens' bytes into text, so the incremental detokenizer can produce the
// same text a piece at a time.
struct DecodeRules {
  // sentencepiece (Metaspace decoder with Strip): the first character of the whole decoded text
  // is dropped when it is a space, i.e. the "▁" word-start marker of the first word.
  bool strip_leading_space = false;
  // Ill-formed UTF-8 becomes one U+FFFD per byte (sentencepiece byte fallback) instead of one per
  // maximal ill-formed subsequence (byte-level BPE, from_utf8_lossy).
  bool replacement_per_byte = false;
};

// What a model folder's JSON files say about special tokens, read once by LoadTokenizer.
// A token is nullopt when no file names it and "" when a file sets it to null (tokenizer classes
// have their own defaults for the first case only).
struct TokenizerSettings {
  std::string tokenizer_class;  // tokenizer_config.json "tokenizer_class", e.g. LlamaTokenizer
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
  std::optional<std::string> unk_token;
  std::optional<std::string> pad_token;
  std::vector<std::string> extra_special_tokens;  // additional_special_tokens
  // Explicit add_bos_token / add_eos_token, for tokenizer.model folders; a tokenizer.json's
  // post_processor rules whatever they say (as in transformers 5).
  std::optional<bool> add_bos_token;
  std::optional<bool> add_eos_token;
  std::optional<bool> add_prefix_space;
  // The special tokens a tokenizer.json's post_processor adds, when lorad reads the
  // tokenizer.model beside it instead: they rule over add_bos_token / add_eos_token, as in
  // transformers 5 (which drops those two whenever tokenizer.json exists).
  std::optional<std::vector<int32_t>> template_prefix_ids, template_suffix_ids;
  std::optional<bool> legacy;
  std::vector<AddedToken> added_tokens;  // tokenizer_config.json "added_tokens_decoder"
  std::vector<int32_t> extra_eos_ids;  // generation_config.json's eos_token_id, else config.json's

  // Reads the files that exist in `folder`; a file that exists but does not parse is an error.
  static absl::StatusOr<TokenizerSettings> Load(const std::string& folder);
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids for `text`. Added/special tokens written in the text (<|im_start|>, <s>) map to
  // their ids. With add_special_tokens, BOS/EOS are added as the model's tokenizer config says.
  // Ill-formed UTF-8 in `text` is read as U+FFFD.
  virtual std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const = 0;

  // `text` as a prompt the tokenizer's special tokens begin: the ids Encode(text, true) puts
  // before the text's (the BOS), not those it puts after (an EOS, add_eos_token), as a
  // prompt-response pair's prompt is encoded for training (tokenizer(prompt + response)).
  std::vector<int32_t> EncodePrompt(std::string_view text) const {
    std::vector<int32_t> ids = prefix_ids_;
    const std::vector<int32_t> own = Encode(text, /*add_special_tokens=*/false);
    ids.insert(ids.end(), own.begin(), own.end());
    return ids;
  }

  // Text for `ids`, as transformers' tokenizer.decode(ids, skip_special_tokens) gives it. Ids
  // outside the vocabulary are ignored.
  virtual std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const = 0;

  // The raw bytes a token stands for ("▁the" -> " the", "<0xE6>" -> "\xE6", a byte-level token
  // -> its bytes, an added token -> its text); possibly an incomplete UTF-8 sequence.
  virtual std::string TokenBytes(int32_t id) const = 0;

  // The token's vocabulary string ("▁the", "Ġthe", "<|eot_id|>"); empty for an unknown id.
  virtual std::string Piece(int32_t id) const = 0;

  // Number of ids, added tokens included (the model's embedding may be larger).
  virtual int32_t vocab_size() const = 0;

  // Id of a vocabulary string (see Piece) or added token.
  virtual std::optional<int32_t> IdOf(std::string_view piece) const = 0;

  // True for tokens Decode drops with skip_special_tokens (BOS, EOS, <|eot_id|>...).
  virtual bool IsSpecial(int32_t id) const = 0;

  virtual DecodeRules decode_rules() const = 0;

  int32_t bos_id() const { return bos_id_; }  // -1 when the model has no BOS token
  // Every id that ends generation: the tokenizer's EOS plus generation_config.json's eos list.
  const std::set<int32_t>& eos_ids() const { return eos_ids_; }
  bool IsEos(int32_t id) const { return eos_ids_.count(id) > 0; }

 protected:
  int32_t bos_id_ = -1;
  std::set<int32_t> eos_ids_;
  // Added by Encode(..., add_special_tokens=true) before and after the text's own ids.
  std::vector<int32_t> prefix_ids_;
  std::vector<int32_t> suffix_ids_;
};

// Loads the tokenizer of a Hugging Face model folder. Errors name the file and field.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& folder);

// Marks every token the settings name (BOS, EOS, UNK, PAD, extra special tokens) special in
// `added`, whatever the model file says, as transformers does. Tokens `tokenizer` does not know
// are skipped.
void MarkNamedTokensSpecial(const TokenizerSettings& settings, const Tokenizer& tokenizer,
                            AddedVocabulary& added);

}  // namespace lorad::engine
