#include "engine/model/bpe_tokenizer.h"

#include <algorithm>
#include <queue>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "engine/model/bpe_tokenizer_internal.h"
#include "engine/model/utf8.h"

#ifdef LORAD_HAVE_ICU
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>
#endif

namespace lorad::engine {
namespace {

using bpe_internal::Alphabet;
using bpe_internal::kWordMarker;
using bpe_internal::PairKey;

std::string Nfc(std::string_view s) {
#ifdef LORAD_HAVE_ICU
  // ASCII is always NFC: most text skips ICU.
  if (std::all_of(s.begin(), s.end(), [](char c) { return (c & 0x80) == 0; })) {
    return std::string(s);
  }
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(status);
  if (U_FAILURE(status)) return std::string(s);
  const icu::UnicodeString u =
      icu::UnicodeString::fromUTF8(icu::StringPiece(s.data(), static_cast<int32_t>(s.size())));
  const icu::UnicodeString normalized = nfc->normalize(u, status);
  if (U_FAILURE(status)) return std::string(s);
  std::string out;
  normalized.toUTF8String(out);
  return out;
#else
  return std::string(s);
#endif
}

}  // namespace

std::vector<std::string> BpeTokenizer::PreTokenize(std::string_view text) const {
  std::vector<std::string> pieces{std::string(text)};
  std::vector<std::string> next;
  std::vector<std::string_view> parts;
  for (const PreTokenizerStep& step : pre_tokenizer_) {
    next.clear();
    for (std::string& piece : pieces) {
      if (step.kind == PreTokenizerStep::Kind::kByteLevelPrefix) {
        if (piece.empty() || piece[0] != ' ') piece.insert(0, " ");
        next.push_back(std::move(piece));
        continue;
      }
      parts.clear();
      step.regex->Split(piece, &parts);
      for (std::string_view part : parts) next.emplace_back(part);
    }
    pieces.swap(next);
  }
  return pieces;
}

std::vector<int32_t> BpeTokenizer::MergePiece(const std::string& piece) const {
  if (ignore_merges_) {
    std::string mapped;
    if (metaspace_) {
      mapped = piece;
    } else {
      for (char c : piece) mapped += Alphabet().chars[static_cast<uint8_t>(c)];
    }
    if (auto it = vocab_.find(mapped); it != vocab_.end()) return {it->second};
  }
  // The word as a linked list of symbols, one per byte (byte-level) or character
  // (sentencepiece-style) to start with.
  struct Symbol {
    int32_t id;
    int prev;
    int next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(piece.size());
  auto add = [&](int32_t id) {
    if (id < 0) {
      if (unk_id_ < 0) return;  // no token and no unk: dropped, as in tokenizers
      if (fuse_unk_ && !symbols.empty() && symbols.back().id == unk_id_) return;
      id = unk_id_;
    }
    const int index = static_cast<int>(symbols.size());
    symbols.push_back({id, index - 1, index + 1, true});
  };
  if (!metaspace_) {
    for (char c : piece) add(byte_ids_[static_cast<uint8_t>(c)]);
  } else {
    for (size_t pos = 0; pos < piece.size();) {
      const size_t start = pos;
      NextCodePoint(piece, &pos);
      const std::string character = piece.substr(start, pos - start);
      if (auto it = vocab_.find(character); it != vocab_.end()) {
        add(it->second);
        continue;
      }
      // Byte fallback: the character's bytes as <0xXX> tokens when all exist.
      bool all = byte_fallback_;
      for (size_t i = start; all && i < pos; ++i) {
        all = fallback_ids_[static_cast<uint8_t>(piece[i])] >= 0;
      }
      if (!all) {
        add(-1);
        continue;
      }
      for (size_t i = start; i < pos; ++i) {
        const int index = static_cast<int>(symbols.size());
        symbols.push_back(
            {fallback_ids_[static_cast<uint8_t>(piece[i])], index - 1, index + 1, true});
      }
    }
  }
  if (symbols.empty()) return {};
  symbols.back().next = -1;

  // Lowest rank first, then leftmost: the order the tokenizers library merges in.
  struct Candidate {
    int32_t rank;
    int pos;
    int32_t id;
    bool operator<(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate> queue;
  auto push = [&](int left) {
    if (left < 0 || symbols[left].next < 0) return;
    auto it = merges_.find(PairKey(symbols[left].id, symbols[symbols[left].next].id));
    if (it != merges_.end()) queue.push({it->second.rank, left, it->second.id});
  };
  for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) push(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    // Stale when either side changed since the candidate was queued.
    auto it = merges_.find(PairKey(left.id, symbols[left.next].id));
    if (it == merges_.end() || it->second.id != top.id) continue;
    Symbol& right = symbols[left.next];
    left.id = top.id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    push(left.prev);
    push(top.pos);
  }
  std::vector<int32_t> ids;
  for (int i = 0; i >= 0; i = symbols[i].next) ids.push_back(symbols[i].id);
  return ids;
}

size_t BpeTokenizer::cached_pieces() const {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  return cache_.size();
}

void BpeTokenizer::EncodePiece(const std::string& piece, std::vector<int32_t>* ids) const {
  if (piece.empty()) return;
  if (piece.size() > kMaxCachedPieceBytes) {
    std::vector<int32_t> merged = MergePiece(piece);
    ids->insert(ids->end(), merged.begin(), merged.end());
    return;
  }
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    auto it = cache_.find(piece);
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> merged = MergePiece(piece);
  ids->insert(ids->end(), merged.begin(), merged.end());
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (cache_.size() >= kCacheCapacity) cache_.clear();
  cache_.emplace(piece, std::move(merged));
}

std::vector<int32_t> BpeTokenizer::Encode(std::string_view text, bool add_special_tokens) const {
  std::string repaired;
  if (!IsValidUtf8(text)) {
    repaired = Utf8Lossy(text);
    text = repaired;
  }
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = prefix_ids_;
  for (const AddedVocabulary::Segment& seg : added_.Split(text)) {
    if (seg.id >= 0) {
      ids.push_back(seg.id);
      continue;
    }
    const std::string normalized = nfc_ ? Nfc(seg.text) : std::string(seg.text);
    if (metaspace_) {
      EncodeMetaspace(normalized, seg.offset == 0, &ids);
      continue;
    }
    for (const std::string& piece : PreTokenize(normalized)) EncodePiece(piece, &ids);
  }
  if (add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

void BpeTokenizer::EncodeMetaspace(const std::string& text, bool at_start,
                                   std::vector<int32_t>* ids) const {
  // tokenizers' Metaspace: spaces become "▁", and "▁" goes in front unless the text starts
  // with one already (prepend_scheme "first": only the input's start, not after an added token).
  std::string s = absl::StrReplaceAll(text, {{" ", kWordMarker}});
  const bool prepend = prepend_ == Prepend::kAlways || (prepend_ == Prepend::kFirst && at_start);
  if (prepend && !absl::StartsWith(s, kWordMarker)) s.insert(0, kWordMarker);
  if (!metaspace_split_) {
    EncodePiece(s, ids);
    return;
  }
  // split: each piece starts at a "▁" (the delimiter merged with what follows it).
  size_t start = 0;
  while (start < s.size()) {
    size_t next = s.find(kWordMarker, start + 1);
    if (start == 0 && !absl::StartsWith(s, kWordMarker)) next = s.find(kWordMarker);
    if (next == std::string::npos) next = s.size();
    EncodePiece(s.substr(start, next - start), ids);
    start = next;
  }
}

std::string BpeTokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  if (metaspace_) {  // the ByteFallback decoder: runs of <0xXX> tokens judged as a whole
    std::string out, run;
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size() || (skip_special_tokens && IsSpecial(id))) continue;
      if (byte_value_[id] >= 0) {
        run.push_back(static_cast<char>(byte_value_[id]));
        continue;
      }
      AppendByteFallbackRun(run, &out);
      run.clear();
      out += token_bytes_[id];
    }
    AppendByteFallbackRun(run, &out);
    if (strip_leading_space_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
    return out;
  }
  std::string bytes;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size() || (skip_special_tokens && IsSpecial(id))) continue;
    bytes += token_bytes_[id];
  }
  return Utf8Lossy(bytes);
}

DecodeRules BpeTokenizer::decode_rules() const {
  DecodeRules rules;
  if (metaspace_) {
    rules.strip_leading_space = strip_leading_space_;
    rules.replacement_per_byte = true;
  }
  return rules;
}

std::string BpeTokenizer::TokenBytes(int32_t id) const {
  return (id < 0 || id >= vocab_size()) ? "" : token_bytes_[id];
}

std::string BpeTokenizer::Piece(int32_t id) const {
  return (id < 0 || id >= vocab_size()) ? "" : pieces_[id];
}

std::optional<int32_t> BpeTokenizer::IdOf(std::string_view piece) const {
  if (auto id = added_.IdOf(piece)) return id;
  auto it = vocab_.find(std::string(piece));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

}  // namespace lorad::engine
