#include "engine/model/bpe_tokenizer.h"

#include <algorithm>
#include <fstream>
#include <queue>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "engine/model/json_file.h"
#include "engine/model/utf8.h"
#include "nlohmann/json.hpp"

#ifdef LORAD_HAVE_ICU
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>
#endif

namespace lorad::engine {
namespace {

using nlohmann::json;

// Sentencepiece's word marker, U+2581, that Metaspace puts for spaces.
constexpr char kWordMarker[] = "\xE2\x96\x81";

// GPT-2's pre-tokenizer regex, used by ByteLevel(use_regex=true).
constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// GPT-2's byte alphabet: printable bytes stand for themselves, the others for U+0100 upwards,
// so that every byte is a visible character in vocab strings ("Ġ" is the space).
struct ByteAlphabet {
  std::string chars[256];                       // byte -> its character, UTF-8
  std::unordered_map<char32_t, uint8_t> bytes;  // character -> byte
  ByteAlphabet() {
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      const char32_t cp = printable ? static_cast<char32_t>(b) : next++;
      AppendCodePoint(cp, &chars[b]);
      bytes[cp] = static_cast<uint8_t>(b);
    }
  }
};

const ByteAlphabet& Alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

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

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

std::string TypeOf(const json& j) {
  auto it = j.find("type");
  return (it != j.end() && it->is_string()) ? it->get<std::string>() : "";
}

bool BoolField(const json& j, const char* key, bool fallback) {
  auto it = j.find(key);
  return (it != j.end() && it->is_boolean()) ? it->get<bool>() : fallback;
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
    tokens.insert(tokens.end(), settings.added_tokens.begin(), settings.added_tokens.end());
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
  std::ifstream in(json_path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(json_path, ": cannot be read"));
  std::stringstream text;
  text << in.rdbuf();
  return Parse(text.str(), json_path, settings);
}

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Parse(
    const std::string& json_text, const std::string& source, const TokenizerSettings& settings) {
  if (auto s = CheckJsonNesting(json_text, source); !s.ok()) return s;
  const json root = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return absl::InvalidArgumentError(source + ": not valid JSON");
  std::unique_ptr<BpeTokenizer> t(new BpeTokenizer());
  try {
    BpeTokenizerParser parser(source, t.get());
    if (absl::Status s = parser.Parse(root, settings); !s.ok()) return s;
  } catch (const json::exception& e) {  // a field of an unexpected JSON type
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", e.what()));
  }
  return t;
}

absl::Status BpeTokenizer::ReadPostProcessor(const std::string& json_path,
                                             std::vector<int32_t>* prefix,
                                             std::vector<int32_t>* suffix) {
  std::ifstream in(json_path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(json_path, ": cannot be read"));
  std::stringstream text;
  text << in.rdbuf();
  if (auto s = CheckJsonNesting(text.str(), json_path); !s.ok()) return s;
  const json root = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError(json_path + ": not valid JSON");
  }
  BpeTokenizer scratch;
  try {
    return BpeTokenizerParser(json_path, &scratch).PostProcessorOf(root, prefix, suffix);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(json_path, ": ", e.what()));
  }
}

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
