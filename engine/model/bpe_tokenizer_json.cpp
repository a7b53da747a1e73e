// BpeTokenizer's reader of tokenizer.json (Load, Parse, ReadPostProcessor): the model, added
// tokens, normalizer, pre-tokenizer, decoder and post-processor, each refusal naming the file and
// the field. Encoding and decoding are in bpe_tokenizer.cpp.
#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "engine/model/bpe_tokenizer.h"
#include "engine/model/bpe_tokenizer_internal.h"
#include "engine/model/json_file.h"
#include "engine/model/utf8.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

using bpe_internal::Alphabet;
using bpe_internal::kWordMarker;
using bpe_internal::PairKey;
using nlohmann::json;

// GPT-2's pre-tokenizer regex, used by ByteLevel(use_regex=true).
constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// The bytes a vocabulary string stands for: each character mapped back through the byte
// alphabet, or the string itself when a character is outside it (the ByteLevel decoder's rule,
// which lets added tokens such as <|eot_id|> through unchanged).
std::string VocabStringBytes(const std::string& s) {
  std::string out;
  for (size_t pos = 0; pos < s.size();) {
    const char32_t cp = NextCodePoint(s, &pos);
    auto it = Alphabet().bytes.find(cp);
    if (it == Alphabet().bytes.end()) return s;
    out.push_back(static_cast<char>(it->second));
  }
  return out;
}

std::string TypeOf(const json& j) {
  auto it = j.find("type");
  return (it != j.end() && it->is_string()) ? it->get<std::string>() : "";
}

bool BoolField(const json& j, const char* key, bool fallback) {
  auto it = j.find(key);
  return (it != j.end() && it->is_boolean()) ? it->get<bool>() : fallback;
}

// The whole of `path`, for Load and ReadPostProcessor.
absl::StatusOr<std::string> ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot be read"));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// `text` as JSON, its nesting bounded first; errors name `source`.
absl::StatusOr<json> ParseJson(const std::string& text, const std::string& source) {
  if (auto s = CheckJsonNesting(text, source); !s.ok()) return s;
  json root = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return absl::InvalidArgumentError(source + ": not valid JSON");
  return root;
}

}  // namespace

// Reads tokenizer.json into a BpeTokenizer. Every refusal names the file and the field.
class BpeTokenizerParser {
 public:
  BpeTokenizerParser(const std::string& source, BpeTokenizer* t) : source_(source), t_(t) {}

  absl::Status Parse(const json& root, const TokenizerSettings& settings) {
    if (!root.is_object() || !root.contains("model") || !root["model"].is_object()) {
      return Invalid("model", "is missing");
    }
    if (absl::Status s = ParseModel(root["model"]); !s.ok()) return s;
    if (absl::Status s = ParseAddedTokens(root.value("added_tokens", json::array()), settings);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = ParseNormalizer(root.value("normalizer", json()), "normalizer"); !s.ok()) {
      return s;
    }
    bool byte_level = false;
    if (absl::Status s =
            ParsePreTokenizer(root.value("pre_tokenizer", json()), "pre_tokenizer", &byte_level);
        !s.ok()) {
      return s;
    }
    if (byte_level == t_->metaspace_) {
      return Unsupported("pre_tokenizer", byte_level ? "has both ByteLevel and Metaspace steps"
                                                     : "has no ByteLevel or Metaspace step");
    }
    if (t_->byte_fallback_ && !t_->metaspace_) {
      return Unsupported("model.byte_fallback", "is true in a byte-level BPE");
    }
    if (absl::Status s = t_->metaspace_
                             ? ParseMetaspaceDecoder(root.value("decoder", json()), "decoder")
                             : ParseDecoder(root.value("decoder", json()), "decoder");
        !s.ok()) {
      return s;
    }
    SetTokenBytes();
    std::vector<int32_t> prefix, suffix;
    if (absl::Status s = ParsePostProcessor(root.value("post_processor", json()), "post_processor",
                                            &prefix, &suffix);
        !s.ok()) {
      return s;
    }
    ApplySettings(settings, prefix, suffix);
    return absl::OkStatus();
  }

  // The post_processor's special tokens alone (BpeTokenizer::ReadPostProcessor).
  absl::Status PostProcessorOf(const json& root, std::vector<int32_t>* prefix,
                               std::vector<int32_t>* suffix) {
    return ParsePostProcessor(root.value("post_processor", json()), "post_processor", prefix,
                              suffix);
  }

 private:
  absl::Status Invalid(const std::string& field, const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": field '", field, "' ", what));
  }
  absl::Status Unsupported(const std::string& field, const std::string& what) {
    return absl::UnimplementedError(
        absl::StrCat(source_, ": field '", field, "' ", what,
                     "; lorad reads byte-level BPE tokenizer.json files (Llama 3, Qwen2, GPT-2 "
                     "style) and sentencepiece tokenizer.model files"));
  }

  absl::Status ParseModel(const json& model) {
    const std::string type = TypeOf(model);
    if (!type.empty() && type != "BPE") {
      return Unsupported("model.type", absl::StrCat("is '", type, "'"));
    }
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      auto it = model.find(key);
      if (it != model.end() && !it->is_null() &&
          !(it->is_string() && it->get_ref<const std::string&>().empty())) {
        return Unsupported(absl::StrCat("model.", key), "is set");
      }
    }
    t_->byte_fallback_ = BoolField(model, "byte_fallback", false);
    auto vocab = model.find("vocab");
    if (vocab == model.end() || !vocab->is_object()) {
      return Invalid("model.vocab", "must be an object of token -> id");
    }
    int32_t max_id = -1;
    for (const auto& [token, id] : vocab->items()) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > kMaxTokenId) {
        return Invalid(absl::StrCat("model.vocab['", token, "']"),
                       absl::StrCat("must be an id in [0, ", kMaxTokenId, "]"));
      }
      t_->vocab_[token] = id.get<int32_t>();
      max_id = std::max(max_id, id.get<int32_t>());
    }
    t_->pieces_.assign(max_id + 1, "");
    for (const auto& [token, id] : t_->vocab_) t_->pieces_[id] = token;
    for (int b = 0; b < 256; ++b) {
      auto it = t_->vocab_.find(Alphabet().chars[b]);
      t_->byte_ids_[b] = it == t_->vocab_.end() ? -1 : it->second;
    }

    auto merges = model.find("merges");
    if (merges == model.end() || !merges->is_array()) {
      return Invalid("model.merges", "must be a list");
    }
    int32_t rank = 0;
    for (const auto& m : *merges) {
      std::string left, right;
      if (m.is_string()) {  // "a b" (tokenizers < 0.20, Llama 3)
        const std::string& s = m.get_ref<const std::string&>();
        const size_t space = s.find(' ', 1);
        if (space == std::string::npos) {
          return Invalid(absl::StrCat("model.merges[", rank, "]"), "is not \"left right\"");
        }
        left = s.substr(0, space);
        right = s.substr(space + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        left = m[0].get<std::string>();  // ["a", "b"] (tokenizers >= 0.20)
        right = m[1].get<std::string>();
      } else {
        return Invalid(absl::StrCat("model.merges[", rank, "]"),
                       "must be \"left right\" or [left, right]");
      }
      auto l = t_->vocab_.find(left), r = t_->vocab_.find(right),
           merged = t_->vocab_.find(left + right);
      if (l == t_->vocab_.end() || r == t_->vocab_.end() || merged == t_->vocab_.end()) {
        return Invalid(absl::StrCat("model.merges[", rank, "]"),
                       absl::StrCat("('", left, "', '", right,
                                    "') uses a token missing from "
                                    "model.vocab"));
      }
      // The first (lowest-rank) entry of a pair wins, as in the tokenizers library.
      t_->merges_.emplace(PairKey(l->second, r->second), BpeTokenizer::Merge{rank, merged->second});
      ++rank;
    }
    t_->ignore_merges_ = BoolField(model, "ignore_merges", false);
    t_->fuse_unk_ = BoolField(model, "fuse_unk", false);
    if (model.contains("unk_token") && model["unk_token"].is_string()) {
      auto it = t_->vocab_.find(model["unk_token"].get<std::string>());
      if (it != t_->vocab_.end()) t_->unk_id_ = it->second;
    }
    return absl::OkStatus();
  }

  absl::Status ParseAddedTokens(const json& list, const TokenizerSettings& settings) {
    if (!list.is_array()) return Invalid("added_tokens", "must be a list");
    std::vector<AddedToken> tokens;
    for (size_t i = 0; i < list.size(); ++i) {
      const json& a = list[i];
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() ||
          !a.contains("content") || !a["content"].is_string() || a["id"].get<int64_t>() < 0 ||
          a["id"].get<int64_t>() > kMaxTokenId) {
        return Invalid(absl::StrCat("added_tokens[", i, "]"),
                       absl::StrCat("must have an id in [0, ", kMaxTokenId, "] and a content"));
      }
      AddedToken t;
      t.id = a["id"].get<int32_t>();
      t.content = a["content"].get<std::string>();
      t.special = BoolField(a, "special", false);
      t.lstrip = BoolField(a, "lstrip", false);
      t.rstrip = BoolField(a, "rstrip", false);
      t.single_word = BoolField(a, "single_word", false);
      tokens.push_back(std::move(t));
    }
    // tokenizer_config.json's entries come last and win, except that one never makes a token
    // tokenizer.json calls special a plain one (transformers still skips <|eom_id|> there).
    std::set<int32_t> special_in_json;
    for (const AddedToken& t : tokens) {
      if (t.special) special_in_json.insert(t.id);
    }
    for (AddedToken t : settings.added_tokens) {
      t.special = t.special || special_in_json.count(t.id) > 0;
      tokens.push_back(std::move(t));
    }
    for (const AddedToken& t : tokens) {
      t_->added_.Add(t);
      if (t.id >= static_cast<int32_t>(t_->pieces_.size())) t_->pieces_.resize(t.id + 1);
      t_->pieces_[t.id] = t.content;
    }
    // transformers 5 decodes a tokenizer.json through `tokenizers`, which skips its own special
    // tokens and BOS/EOS/UNK/PAD, but not the extra special tokens tokenizer_config.json lists
    // when tokenizer.json has them as plain added tokens (as it saves Llama 2 chat markers).
    TokenizerSettings named = settings;
    named.extra_special_tokens.clear();
    MarkNamedTokensSpecial(named, *t_, t_->added_);
    return absl::OkStatus();
  }

  // The bytes each id decodes to: byte-level strings mapped back through GPT-2's alphabet, or
  // (sentencepiece-style) "▁" as a space and <0xXX> tokens as their byte.
  void SetTokenBytes() {
    const size_t n = t_->pieces_.size();
    t_->token_bytes_.resize(n);
    std::fill(std::begin(t_->fallback_ids_), std::end(t_->fallback_ids_), -1);
    t_->byte_value_.assign(t_->metaspace_ ? n : 0, -1);
    for (size_t id = 0; id < n; ++id) {
      const std::string& piece = t_->pieces_[id];
      if (!t_->metaspace_) {
        t_->token_bytes_[id] = VocabStringBytes(piece);
        continue;
      }
      const int byte = t_->byte_fallback_ ? ByteFallbackValue(piece) : -1;
      if (byte >= 0 && !t_->added_.Find(static_cast<int32_t>(id))) {
        t_->byte_value_[id] = static_cast<int16_t>(byte);
        t_->fallback_ids_[byte] = static_cast<int32_t>(id);
        t_->token_bytes_[id] = std::string(1, static_cast<char>(byte));
      } else {
        t_->token_bytes_[id] = absl::StrReplaceAll(piece, {{kWordMarker, " "}});
      }
    }
  }

  absl::Status ParseNormalizer(const json& n, const std::string& field) {
    if (n.is_null()) return absl::OkStatus();
    const std::string type = TypeOf(n);
    if (type == "Sequence") {
      const json& list = n.value("normalizers", json::array());
      for (size_t i = 0; i < list.size(); ++i) {
        if (absl::Status s = ParseNormalizer(list[i], absl::StrCat(field, ".normalizers[", i, "]"));
            !s.ok()) {
          return s;
        }
      }
      return absl::OkStatus();
    }
    if (type == "NFC") {
#ifdef LORAD_HAVE_ICU
      t_->nfc_ = true;
      return absl::OkStatus();
#else
      return Unsupported(field + ".type", "is 'NFC' and lorad was built without ICU");
#endif
    }
    return Unsupported(field + ".type", absl::StrCat("is '", type, "'"));
  }

  absl::Status AddSplit(absl::StatusOr<SplitRegex> regex) {
    if (!regex.ok()) return regex.status();
    BpeTokenizer::PreTokenizerStep step;
    step.regex = std::make_unique<SplitRegex>(std::move(*regex));
    t_->pre_tokenizer_.push_back(std::move(step));
    return absl::OkStatus();
  }

  absl::Status ParsePreTokenizer(const json& p, const std::string& field, bool* byte_level) {
    if (p.is_null()) return Unsupported(field, "is null");
    const std::string type = TypeOf(p);
    const std::string where = absl::StrCat(source_, ": ", field);
    if (type == "Sequence") {
      const json& list = p.value("pretokenizers", json::array());
      for (size_t i = 0; i < list.size(); ++i) {
        if (absl::Status s = ParsePreTokenizer(
                list[i], absl::StrCat(field, ".pretokenizers[", i, "]"), byte_level);
            !s.ok()) {
          return s;
        }
      }
      return absl::OkStatus();
    }
    if (type == "Split") {
      const std::string behavior = p.value("behavior", "");
      if (behavior != "Isolated") {
        return Unsupported(field + ".behavior", absl::StrCat("is '", behavior, "'"));
      }
      if (BoolField(p, "invert", false)) return Unsupported(field + ".invert", "is true");
      const json& pattern = p.value("pattern", json());
      if (pattern.contains("Regex") && pattern["Regex"].is_string()) {
        return AddSplit(
            SplitRegex::Compile(pattern["Regex"].get<std::string>(), where + ".pattern.Regex"));
      }
      if (pattern.contains("String") && pattern["String"].is_string()) {
        return AddSplit(
            SplitRegex::Literal(pattern["String"].get<std::string>(), where + ".pattern.String"));
      }
      return Invalid(field + ".pattern", "must be {\"Regex\": ...} or {\"String\": ...}");
    }
    if (type == "Digits") {
      // Digits are Unicode numerics (Rust's char::is_numeric), one per piece or in runs.
      return AddSplit(SplitRegex::Compile(
          BoolField(p, "individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)", where));
    }
    if (type == "Metaspace") {
      if (p.value("replacement", "") != kWordMarker) {
        return Unsupported(field + ".replacement", "is not \"\u2581\"");
      }
      t_->metaspace_ = true;
      // prepend_scheme (tokenizers >= 0.15), else the older add_prefix_space.
      const std::string scheme =
          p.value("prepend_scheme", BoolField(p, "add_prefix_space", true) ? "always" : "never");
      if (scheme == "always") {
        t_->prepend_ = BpeTokenizer::Prepend::kAlways;
      } else if (scheme == "first") {
        t_->prepend_ = BpeTokenizer::Prepend::kFirst;
      } else if (scheme == "never") {
        t_->prepend_ = BpeTokenizer::Prepend::kNever;
      } else {
        return Unsupported(field + ".prepend_scheme", absl::StrCat("is '", scheme, "'"));
      }
      t_->metaspace_split_ = BoolField(p, "split", true);
      return absl::OkStatus();
    }
    if (type == "ByteLevel") {
      *byte_level = true;
      if (BoolField(p, "add_prefix_space", false)) {
        BpeTokenizer::PreTokenizerStep step;
        step.kind = BpeTokenizer::PreTokenizerStep::Kind::kByteLevelPrefix;
        t_->pre_tokenizer_.push_back(std::move(step));
      }
      if (BoolField(p, "use_regex", true)) return AddSplit(SplitRegex::Compile(kGpt2Regex, where));
      return absl::OkStatus();
    }
    return Unsupported(field + ".type", absl::StrCat("is '", type, "'"));
  }

  absl::Status ParseDecoder(const json& d, const std::string& field) {
    const std::string type = TypeOf(d);
    if (type == "ByteLevel") return absl::OkStatus();
    if (type == "Sequence") {
      const json& list = d.value("decoders", json::array());
      if (list.size() == 1) return ParseDecoder(list[0], field + ".decoders[0]");
    }
    return Unsupported(field + ".type", absl::StrCat("is '", type.empty() ? "null" : type,
                                                     "' (expected ByteLevel)"));
  }

  // Sentencepiece-style decoders: Metaspace (older files), or the Sequence transformers writes:
  // Replace("▁" -> " "), ByteFallback, Fuse, Strip(" ", 1, 0). Either drops the first space.
  absl::Status ParseMetaspaceDecoder(const json& d, const std::string& field) {
    const std::string type = TypeOf(d);
    if (type == "Metaspace") {
      t_->strip_leading_space_ =
          d.value("prepend_scheme", BoolField(d, "add_prefix_space", true) ? "always" : "never") !=
          "never";
      return absl::OkStatus();
    }
    if (type != "Sequence") {
      return Unsupported(field + ".type", absl::StrCat("is '", type.empty() ? "null" : type,
                                                       "' (expected Metaspace or a Sequence)"));
    }
    const json& list = d.value("decoders", json::array());
    for (size_t i = 0; i < list.size(); ++i) {
      const json& step = list[i];
      const std::string step_type = TypeOf(step);
      const std::string at = absl::StrCat(field, ".decoders[", i, "]");
      if (step_type == "Replace") {
        const json& pattern = step.value("pattern", json::object());
        if (pattern.value("String", "") != kWordMarker || step.value("content", "") != " ") {
          return Unsupported(at, "replaces something else than \"\u2581\" by a space");
        }
      } else if (step_type == "Strip") {
        if (step.value("content", "") != " " || step.value("start", 0) != 1 ||
            step.value("stop", 0) != 0) {
          return Unsupported(at, "strips something else than one leading space");
        }
        t_->strip_leading_space_ = true;
      } else if (step_type != "ByteFallback" && step_type != "Fuse") {
        return Unsupported(at + ".type", absl::StrCat("is '", step_type, "'"));
      }
    }
    return absl::OkStatus();
  }

  absl::Status ParsePostProcessor(const json& p, const std::string& field,
                                  std::vector<int32_t>* prefix, std::vector<int32_t>* suffix) {
    if (p.is_null()) return absl::OkStatus();
    const std::string type = TypeOf(p);
    if (type == "ByteLevel") return absl::OkStatus();  // offsets only
    if (type == "Sequence") {
      const json& list = p.value("processors", json::array());
      for (size_t i = 0; i < list.size(); ++i) {
        if (absl::Status s = ParsePostProcessor(
                list[i], absl::StrCat(field, ".processors[", i, "]"), prefix, suffix);
            !s.ok()) {
          return s;
        }
      }
      return absl::OkStatus();
    }
    if (type != "TemplateProcessing") {
      return Unsupported(field + ".type", absl::StrCat("is '", type, "'"));
    }
    // single: [{"SpecialToken": {"id": "<|begin_of_text|>"}}, {"Sequence": {"id": "A"}}]; the
    // special tokens before $A go in front, those after it behind.
    const json& single = p.value("single", json::array());
    const json& specials = p.value("special_tokens", json::object());
    bool seen_sequence = false;
    for (size_t i = 0; i < single.size(); ++i) {
      const json& item = single[i];
      if (item.contains("Sequence")) {
        seen_sequence = true;
        continue;
      }
      const std::string name = item.contains("SpecialToken") && item["SpecialToken"].is_object()
                                   ? item["SpecialToken"].value("id", "")
                                   : "";
      if (name.empty() || !specials.contains(name) || !specials[name].contains("ids") ||
          !specials[name]["ids"].is_array()) {
        return Invalid(absl::StrCat(field, ".single[", i, "]"),
                       "must name a token listed in special_tokens");
      }
      for (const auto& id : specials[name]["ids"]) {
        if (!id.is_number_integer()) {
          return Invalid(absl::StrCat(field, ".special_tokens['", name, "'].ids"), "must hold ids");
        }
        (seen_sequence ? suffix : prefix)->push_back(id.get<int32_t>());
      }
    }
    return absl::OkStatus();
  }

  // BOS/EOS: the tokenizer.json post-processor alone decides what Encode adds; transformers 5
  // drops tokenizer_config.json's add_bos_token / add_eos_token whenever tokenizer.json exists.
  // A LlamaTokenizer folder's sentencepiece-style pipeline is the class's, rebuilt from
  // add_prefix_space and legacy whatever tokenizer.json says (transformers 5's LlamaTokenizer:
  // no normalizer, Metaspace without split, a decoder that strips the space it prepends).
  void ApplySettings(const TokenizerSettings& settings, const std::vector<int32_t>& prefix,
                     const std::vector<int32_t>& suffix) {
    std::optional<int32_t> bos, eos;
    if (settings.bos_token && !settings.bos_token->empty()) bos = t_->IdOf(*settings.bos_token);
    if (settings.eos_token && !settings.eos_token->empty()) eos = t_->IdOf(*settings.eos_token);
    t_->bos_id_ = bos.value_or(-1);
    if (eos) t_->eos_ids_.insert(*eos);
    for (int32_t id : settings.extra_eos_ids) t_->eos_ids_.insert(id);
    t_->prefix_ids_ = prefix;
    t_->suffix_ids_ = suffix;
    const bool llama_class = settings.tokenizer_class == "LlamaTokenizer" ||
                             settings.tokenizer_class == "LlamaTokenizerFast";
    if (t_->metaspace_ && llama_class) {
      const bool add_prefix_space = settings.add_prefix_space.value_or(true);
      t_->prepend_ = !add_prefix_space                 ? BpeTokenizer::Prepend::kNever
                     : settings.legacy.value_or(false) ? BpeTokenizer::Prepend::kAlways
                                                       : BpeTokenizer::Prepend::kFirst;
      t_->metaspace_split_ = false;
      t_->strip_leading_space_ = add_prefix_space;
      t_->nfc_ = false;
    }
  }

  const std::string& source_;
  BpeTokenizer* t_;
};

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Load(
    const std::string& json_path, const TokenizerSettings& settings) {
  auto text = ReadText(json_path);
  if (!text.ok()) return text.status();
  return Parse(*text, json_path, settings);
}

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Parse(
    const std::string& json_text, const std::string& source, const TokenizerSettings& settings) {
  auto root = ParseJson(json_text, source);
  if (!root.ok()) return root.status();
  std::unique_ptr<BpeTokenizer> t(new BpeTokenizer());
  try {
    BpeTokenizerParser parser(source, t.get());
    if (absl::Status s = parser.Parse(*root, settings); !s.ok()) return s;
  } catch (const json::exception& e) {  // a field of an unexpected JSON type
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", e.what()));
  }
  return t;
}

absl::Status BpeTokenizer::ReadPostProcessor(const std::string& json_path,
                                             std::vector<int32_t>* prefix,
                                             std::vector<int32_t>* suffix) {
  auto text = ReadText(json_path);
  if (!text.ok()) return text.status();
  auto root = ParseJson(*text, json_path);
  if (!root.ok()) return root.status();
  if (!root->is_object()) return absl::InvalidArgumentError(json_path + ": not a JSON object");
  BpeTokenizer scratch;
  try {
    return BpeTokenizerParser(json_path, &scratch).PostProcessorOf(*root, prefix, suffix);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(json_path, ": ", e.what()));
  }
}

}  // namespace lorad::engine
