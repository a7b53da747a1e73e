#include "engine/model/tokenizer.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "engine/model/bpe_tokenizer.h"
#include "engine/model/json_file.h"
#include "engine/model/sentencepiece_tokenizer.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// A special token is written as a string, as {"content": "..."} (AddedToken), or as null.
// Leaves `out` alone when the key is absent.
absl::Status ReadTokenString(const json& j, const std::string& key, const std::string& source,
                             std::optional<std::string>* out) {
  auto it = j.find(key);
  if (it == j.end()) return absl::OkStatus();
  if (it->is_null()) {
    *out = "";
  } else if (it->is_string()) {
    *out = it->get<std::string>();
  } else if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    *out = (*it)["content"].get<std::string>();
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field '", key, "' must be a string, {\"content\": ...} or null"));
  }
  return absl::OkStatus();
}

absl::Status ReadBool(const json& j, const std::string& key, const std::string& source,
                      std::optional<bool>* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": field '", key, "' must be a bool"));
  }
  *out = it->get<bool>();
  return absl::OkStatus();
}

void ReadTokenIds(const json& j, const std::string& key, std::vector<int32_t>* out) {
  auto it = j.find(key);
  if (it == j.end()) return;
  // Ids outside the vocabulary's range are ignored (they name no token lorad could emit).
  auto add = [&](const json& v) {
    if (!v.is_number_integer()) return;
    const int64_t id = v.get<int64_t>();
    if (id >= 0 && id <= kMaxTokenId) out->push_back(static_cast<int32_t>(id));
  };
  if (it->is_array()) {
    for (const auto& v : *it) add(v);
  } else {
    add(*it);
  }
}

// additional_special_tokens (transformers 4) / extra_special_tokens (transformers 5): a list of
// strings or AddedToken objects.
void ReadExtraSpecialTokens(const json& j, std::vector<std::string>* out) {
  for (const char* key : {"additional_special_tokens", "extra_special_tokens"}) {
    auto it = j.find(key);
    if (it == j.end() || !it->is_array()) continue;
    for (const auto& v : *it) {
      if (v.is_string()) out->push_back(v.get<std::string>());
      if (v.is_object() && v.contains("content") && v["content"].is_string()) {
        out->push_back(v["content"].get<std::string>());
      }
    }
  }
}

absl::Status ReadAddedTokensDecoder(const json& j, const std::string& source,
                                    std::vector<AddedToken>* out) {
  auto it = j.find("added_tokens_decoder");
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field 'added_tokens_decoder' must be an object"));
  }
  for (const auto& [key, value] : it->items()) {
    AddedToken t;
    char* end = nullptr;
    const long id = std::strtol(key.c_str(), &end, 10);
    if (end == key.c_str() || *end != '\0' || id < 0 || !value.is_object() ||
        !value.contains("content") || !value["content"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": added_tokens_decoder['", key,
                                                     "'] must map an id to {\"content\": ...}"));
    }
    if (id > kMaxTokenId) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": added_tokens_decoder['", key,
                       "']: the id is above the largest lorad reads (", kMaxTokenId, ")"));
    }
    t.id = static_cast<int32_t>(id);
    t.content = value["content"].get<std::string>();
    for (auto [field, flag] :
         {std::pair{"special", &t.special}, std::pair{"lstrip", &t.lstrip},
          std::pair{"rstrip", &t.rstrip}, std::pair{"single_word", &t.single_word}}) {
      auto f = value.find(field);
      if (f == value.end() || f->is_null()) continue;
      if (!f->is_boolean()) {
        return absl::InvalidArgumentError(absl::StrCat(source, ": added_tokens_decoder['", key,
                                                       "'].", field, " must be true or false"));
      }
      *flag = f->get<bool>();
    }
    out->push_back(std::move(t));
  }
  return absl::OkStatus();
}

absl::Status ReadTokenizerConfig(const json& j, const std::string& source, TokenizerSettings* s) {
  if (j.contains("tokenizer_class") && j["tokenizer_class"].is_string()) {
    s->tokenizer_class = j["tokenizer_class"].get<std::string>();
  }
  for (auto [key, field] : {std::pair{"bos_token", &s->bos_token},
                            {"eos_token", &s->eos_token},
                            {"unk_token", &s->unk_token},
                            {"pad_token", &s->pad_token}}) {
    if (absl::Status st = ReadTokenString(j, key, source, field); !st.ok()) return st;
  }
  for (auto [key, field] : {std::pair{"add_bos_token", &s->add_bos_token},
                            {"add_eos_token", &s->add_eos_token},
                            {"add_prefix_space", &s->add_prefix_space},
                            {"legacy", &s->legacy}}) {
    if (absl::Status st = ReadBool(j, key, source, field); !st.ok()) return st;
  }
  ReadExtraSpecialTokens(j, &s->extra_special_tokens);
  return ReadAddedTokensDecoder(j, source, &s->added_tokens);
}

}  // namespace

absl::StatusOr<TokenizerSettings> TokenizerSettings::Load(const std::string& folder) {
  TokenizerSettings s;
  const fs::path dir(folder);
  // special_tokens_map.json first: tokenizer_config.json, the newer file, wins where both speak.
  const fs::path map_path = dir / "special_tokens_map.json";
  absl::StatusOr<std::optional<json>> map = ReadJsonObjectIfPresent(map_path.string());
  if (!map.ok()) return map.status();
  if (map->has_value()) {
    for (auto [key, field] : {std::pair{"bos_token", &s.bos_token},
                              {"eos_token", &s.eos_token},
                              {"unk_token", &s.unk_token},
                              {"pad_token", &s.pad_token}}) {
      if (absl::Status st = ReadTokenString(**map, key, map_path.string(), field); !st.ok()) {
        return st;
      }
    }
    ReadExtraSpecialTokens(**map, &s.extra_special_tokens);
  }
  const fs::path config_path = dir / "tokenizer_config.json";
  absl::StatusOr<std::optional<json>> config = ReadJsonObjectIfPresent(config_path.string());
  if (!config.ok()) return config.status();
  if (config->has_value()) {
    if (absl::Status st = ReadTokenizerConfig(**config, config_path.string(), &s); !st.ok()) {
      return st;
    }
  }
  // As transformers' generate: generation_config.json's eos list when it has one, else
  // config.json's (from which transformers then builds the generation config).
  for (const char* name : {"generation_config.json", "config.json"}) {
    absl::StatusOr<std::optional<json>> j = ReadJsonObjectIfPresent((dir / name).string());
    if (!j.ok()) return j.status();
    if (j->has_value() && (**j).contains("eos_token_id") && !(**j)["eos_token_id"].is_null()) {
      ReadTokenIds(**j, "eos_token_id", &s.extra_eos_ids);
      break;
    }
  }
  return s;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& folder) {
  std::error_code ec;
  if (!fs::is_directory(folder, ec)) {
    return absl::NotFoundError(
        absl::StrCat("tokenizer folder '", folder, "' does not exist or is not a directory"));
  }
  absl::StatusOr<TokenizerSettings> settings = TokenizerSettings::Load(folder);
  if (!settings.ok()) return settings.status();
  const fs::path json_path = fs::path(folder) / "tokenizer.json";
  const fs::path model_path = fs::path(folder) / "tokenizer.model";
  const bool has_model = fs::exists(model_path, ec);
  if (fs::exists(json_path, ec)) {
    absl::StatusOr<std::unique_ptr<BpeTokenizer>> bpe =
        BpeTokenizer::Load(json_path.string(), *settings);
    if (bpe.ok()) return std::unique_ptr<Tokenizer>(std::move(*bpe));
    // A sentencepiece-style tokenizer.json (Metaspace, byte fallback) beside tokenizer.model:
    // transformers rebuilds that pipeline from the tokenizer class, and so does lorad, from the
    // sentencepiece model.
    if (bpe.status().code() != absl::StatusCode::kUnimplemented) return bpe.status();
    if (!has_model) {  // transformers 5 saves Llama 2 / Mistral tokenizers this way, without it
      return absl::InvalidArgumentError(
          absl::StrCat(bpe.status().message(),
                       "; lorad reads a sentencepiece-style tokenizer.json only beside the model's "
                       "tokenizer.model: copy tokenizer.model from the original model folder into ",
                       folder));
    }
  }
  if (has_model) {
    if (fs::exists(json_path, ec)) {  // read for its post_processor alone
      std::vector<int32_t> prefix, suffix;
      if (auto s = BpeTokenizer::ReadPostProcessor(json_path.string(), &prefix, &suffix); !s.ok()) {
        return s;
      }
      settings->template_prefix_ids = std::move(prefix);
      settings->template_suffix_ids = std::move(suffix);
    }
    absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> sp =
        SentencePieceTokenizer::Load(model_path.string(), *settings);
    if (!sp.ok()) return sp.status();
    return std::unique_ptr<Tokenizer>(std::move(*sp));
  }
  return absl::NotFoundError(absl::StrCat("'", folder,
                                          "' has no tokenizer: expected tokenizer.json (Hugging "
                                          "Face tokenizers) or tokenizer.model (sentencepiece)"));
}

void MarkNamedTokensSpecial(const TokenizerSettings& settings, const Tokenizer& tokenizer,
                            AddedVocabulary& added) {
  std::vector<std::string> named = settings.extra_special_tokens;
  for (const auto* token :
       {&settings.bos_token, &settings.eos_token, &settings.unk_token, &settings.pad_token}) {
    if (token->has_value() && !(*token)->empty()) named.push_back(**token);
  }
  for (const std::string& content : named) {
    const std::optional<int32_t> id = tokenizer.IdOf(content);
    if (!id) continue;
    AddedToken t = added.Find(*id) ? *added.Find(*id) : AddedToken{*id, content};
    t.special = true;
    added.Add(t);
  }
}

}  // namespace lorad::engine
