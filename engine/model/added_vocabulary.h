// AddedVocabulary: the tokens matched in raw text before any model runs (<|im_start|>, <s>,
// <|eot_id|>...). Hugging Face tokenizers split the input on these first and encode only the
// text between them; both lorad tokenizers do the same through this class.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace lorad::engine {

// The largest token id lorad reads: the largest vocabularies hold about 262k tokens, and the
// tokenizer keeps tables indexed by id, so a larger id in a tokenizer file is an error rather than
// gigabytes of tables.
inline constexpr int32_t kMaxTokenId = (1 << 22) - 1;

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;      // dropped by Decode(..., skip_special_tokens=true)
  bool lstrip = false;       // swallows the whitespace on its left
  bool rstrip = false;       // swallows the whitespace on its right
  bool single_word = false;  // matches only when not inside a word
};

class AddedVocabulary {
 public:
  // Adds or updates (by content) a token. A later call for the same content overrides the flags.
  void Add(const AddedToken& token);

  // A run of ordinary text (id == -1) or one matched added token. `offset` is where the segment
  // starts in the input: Metaspace's prepend_scheme "first" only prefixes the segment at 0.
  struct Segment {
    std::string_view text;
    int32_t id = -1;
    size_t offset = 0;
  };
  // Splits `text` at leftmost-longest matches of the added tokens; empty text runs are dropped.
  std::vector<Segment> Split(std::string_view text) const;

  const AddedToken* Find(int32_t id) const;
  std::optional<int32_t> IdOf(std::string_view content) const;
  bool IsSpecial(int32_t id) const;
  bool empty() const { return tokens_.empty(); }
  int32_t max_id() const;  // -1 when empty

 private:
  std::vector<AddedToken> tokens_;
  std::unordered_map<std::string, size_t> by_content_;
  std::unordered_map<int32_t, size_t> by_id_;
  // Token indices by first byte, longest content first, so the first match is the longest.
  std::vector<std::vector<size_t>> by_first_byte_ = std::vector<std::vector<size_t>>(256);
};

}  // namespace lorad::engine
