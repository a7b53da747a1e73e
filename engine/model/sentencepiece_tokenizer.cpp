#include "engine/model/sentencepiece_tokenizer.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/model/utf8.h"

namespace lorad::engine {
namespace {

constexpr std::string_view kWordMarker = "\xE2\x96\x81";  // "▁" U+2581

std::string ReplaceAll(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  for (size_t pos = 0;;) {
    const size_t hit = s.find(from, pos);
    out.append(s.substr(pos, hit - pos));
    if (hit == std::string_view::npos) return out;
    out.append(to);
    pos = hit + from.size();
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::Load(
    const std::string& model_path, const TokenizerSettings& settings) {
  std::ifstream in(model_path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(model_path, ": cannot be read"));
  std::stringstream bytes;
  bytes << in.rdbuf();
  std::unique_ptr<SentencePieceTokenizer> t(new SentencePieceTokenizer());
  if (std::string error = t->model_.LoadFromSerialized(bytes.str()); !error.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(model_path, ": ", error));
  }

  // The added vocabulary as transformers builds it from a sentencepiece model: control and unknown
  // pieces are special, user-defined symbols are not; tokenizer_config.json may add or re-flag.
  const auto& pieces = t->model_.pieces();
  for (size_t id = 0; id < pieces.size(); ++id) {
    const auto type = pieces[id].type;
    if (type == SentencePieceModel::Type::kControl || type == SentencePieceModel::Type::kUnknown ||
        type == SentencePieceModel::Type::kUserDefined) {
      AddedToken token;
      token.id = static_cast<int32_t>(id);
      token.content = pieces[id].text;
      token.special = type != SentencePieceModel::Type::kUserDefined;
      t->added_.Add(token);
    }
  }
  for (const AddedToken& token : settings.added_tokens) t->added_.Add(token);

  t->vocab_size_ = std::max(static_cast<int32_t>(pieces.size()), t->added_.max_id() + 1);
  t->pieces_.resize(t->vocab_size_);
  t->byte_value_.assign(t->vocab_size_, -1);
  for (size_t id = 0; id < pieces.size(); ++id) {
    t->pieces_[id] = pieces[id].text;
    if (pieces[id].type == SentencePieceModel::Type::kByte) {
      t->byte_value_[id] = static_cast<int16_t>(ByteFallbackValue(pieces[id].text));
    }
  }
  for (int32_t id = 0; id < t->vocab_size_; ++id) {
    if (const AddedToken* added = t->added_.Find(id)) t->pieces_[id] = added->content;
    t->piece_ids_.emplace(t->pieces_[id], id);
  }

  MarkNamedTokensSpecial(settings, *t, t->added_);

  // transformers 5's LlamaTokenizer: add_prefix_space (default true) prepends "▁" to the first
  // segment, or to every segment when legacy=true; its decoder strips that space again.
  const bool add_prefix_space = settings.add_prefix_space.value_or(true);
  t->prepend_ = !add_prefix_space                 ? Prepend::kNever
                : settings.legacy.value_or(false) ? Prepend::kAlways
                                                  : Prepend::kFirst;
  t->strip_leading_space_ = add_prefix_space;

  // LlamaTokenizer's defaults apply only when no file names the token at all.
  const std::optional<int32_t> bos = t->IdOf(settings.bos_token.value_or("<s>"));
  const std::optional<int32_t> eos = t->IdOf(settings.eos_token.value_or("</s>"));
  t->bos_id_ = bos.value_or(-1);
  if (eos) t->eos_ids_.insert(*eos);
  for (int32_t id : settings.extra_eos_ids) t->eos_ids_.insert(id);
  if (settings.template_prefix_ids || settings.template_suffix_ids) {
    t->prefix_ids_ = settings.template_prefix_ids.value_or(std::vector<int32_t>());
    t->suffix_ids_ = settings.template_suffix_ids.value_or(std::vector<int32_t>());
  } else {
    if (settings.add_bos_token.value_or(false) && bos) t->prefix_ids_.push_back(*bos);
    if (settings.add_eos_token.value_or(false) && eos) t->suffix_ids_.push_back(*eos);
  }
  return t;
}

void SentencePieceTokenizer::EncodeSegment(std::string_view text, bool prepend_marker,
                                           std::vector<int32_t>* ids) const {
  std::string s = ReplaceAll(text, " ", kWordMarker);
  if (prepend_marker && s.compare(0, kWordMarker.size(), kWordMarker) != 0) {
    s.insert(0, kWordMarker);
  }
  for (int id : model_.Encode(s)) ids->push_back(id);
}

std::vector<int32_t> SentencePieceTokenizer::Encode(std::string_view text,
                                                    bool add_special_tokens) const {
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
    const bool prepend =
        prepend_ == Prepend::kAlways || (prepend_ == Prepend::kFirst && seg.offset == 0);
    EncodeSegment(seg.text, prepend, &ids);
  }
  if (add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

std::string SentencePieceTokenizer::Decode(const std::vector<int32_t>& ids,
                                           bool skip_special_tokens) const {
  std::string out;
  std::string run;  // consecutive byte-fallback bytes
  auto flush_run = [&] {
    AppendByteFallbackRun(run, &out);
    run.clear();
  };
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size_ || (skip_special_tokens && IsSpecial(id))) continue;
    if (byte_value_[id] >= 0) {
      run.push_back(static_cast<char>(byte_value_[id]));
      continue;
    }
    flush_run();
    out += TokenBytes(id);
  }
  flush_run();
  if (strip_leading_space_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

std::string SentencePieceTokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size_) return "";
  if (byte_value_[id] >= 0) return std::string(1, static_cast<char>(byte_value_[id]));
  return ReplaceAll(pieces_[id], kWordMarker, " ");
}

std::string SentencePieceTokenizer::Piece(int32_t id) const {
  return (id < 0 || id >= vocab_size_) ? "" : pieces_[id];
}

std::optional<int32_t> SentencePieceTokenizer::IdOf(std::string_view piece) const {
  if (auto id = added_.IdOf(piece)) return id;
  auto it = piece_ids_.find(std::string(piece));
  if (it == piece_ids_.end()) return std::nullopt;
  return it->second;
}

DecodeRules SentencePieceTokenizer::decode_rules() const {
  DecodeRules rules;
  rules.strip_leading_space = strip_leading_space_;
  rules.replacement_per_byte = true;
  return rules;
}

}  // namespace lorad::engine
