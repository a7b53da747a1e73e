#include "engine/lora/lora_adapter.h"

#include <ATen/CPUGeneratorImpl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/lora/peft_config.h"
#include "engine/model/safetensors.h"
#include "engine/runtime/durable_file.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;

constexpr const char* kConfigFile = "adapter_config.json";
constexpr const char* kWeightsFile = "adapter_model.safetensors";
// PEFT prefixes every key with the wrapper modules' names: PeftModel.base_model (LoraModel)
// .model (the transformers model).
constexpr const char* kKeyPrefix = "base_model.model.";

// One targeted projection: "model.layers.{layer}.{self_attn|mlp}.{projection}".
struct ModulePath {
  int64_t layer = 0;
  std::string projection;
};

bool IsAttentionProjection(const std::string& projection) {
  return projection == "q_proj" || projection == "k_proj" || projection == "v_proj" ||
         projection == "o_proj";
}

std::string ModulePathFor(int64_t layer, const std::string& projection) {
  return absl::StrCat("model.layers.", layer,
                      IsAttentionProjection(projection) ? ".self_attn." : ".mlp.", projection);
}

absl::StatusOr<ModulePath> ParseModulePath(const std::string& path) {
  const auto& known = KnownLoraTargets();
  std::vector<std::string> parts = absl::StrSplit(path, '.');
  ModulePath m;
  if (parts.size() == 5 && parts[0] == "model" && parts[1] == "layers" &&
      absl::SimpleAtoi(parts[2], &m.layer) && m.layer >= 0 &&
      std::find(known.begin(), known.end(), parts[4]) != known.end()) {
    m.projection = parts[4];
    if (ModulePathFor(m.layer, m.projection) == path) return m;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "module '", path,
      "' is not a LoRA target lorad supports (model.layers.<i>.self_attn.{q,k,v,o}_proj or "
      "model.layers.<i>.mlp.{gate,up,down}_proj)"));
}

std::string PeftKey(const std::string& module_path, char factor) {
  return absl::StrCat(kKeyPrefix, module_path, ".lora_", std::string(1, factor), ".weight");
}

// in/out features of a projection, with the config fields they come from for error messages.
struct Features {
  int64_t in = 0;
  int64_t out = 0;
  std::string why;
};

Features ProjectionFeatures(const ModelConfig& m, const std::string& projection) {
  const int64_t head_dim = m.head_dim > 0 ? m.head_dim : m.hidden_size / m.num_attention_heads;
  const int64_t q = m.num_attention_heads * head_dim;
  const int64_t kv = m.num_key_value_heads * head_dim;
  const std::string h = absl::StrCat("hidden_size ", m.hidden_size);
  if (projection == "q_proj") {
    return {m.hidden_size, q, absl::StrCat(h, " -> num_attention_heads x head_dim ", q)};
  }
  if (projection == "k_proj" || projection == "v_proj") {
    return {m.hidden_size, kv, absl::StrCat(h, " -> num_key_value_heads x head_dim ", kv)};
  }
  if (projection == "o_proj") {
    return {q, m.hidden_size, absl::StrCat("num_attention_heads x head_dim ", q, " -> ", h)};
  }
  const std::string inter = absl::StrCat("intermediate_size ", m.intermediate_size);
  if (projection == "down_proj") {
    return {m.intermediate_size, m.hidden_size, absl::StrCat(inter, " -> ", h)};
  }
  return {m.hidden_size, m.intermediate_size, absl::StrCat(h, " -> ", inter)};  // gate, up
}

std::string ShapeString(const torch::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]");
}

template <typename T>
bool Contains(const std::vector<T>& v, const T& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

std::string ErrnoText() { return std::strerror(errno); }

// ---- adapter_model.safetensors ----

// Splits "base_model.model.<path>.lora_A[.<adapter name>].weight" into path and 'A'/'B'. PEFT
// saves without the adapter name; older tools kept it (".lora_A.default.weight").
bool ParsePeftKey(const std::string& key, std::string* module_path, char* factor) {
  if (!absl::StartsWith(key, kKeyPrefix) || !absl::EndsWith(key, ".weight")) return false;
  for (char f : {'A', 'B'}) {
    const std::string marker = absl::StrCat(".lora_", std::string(1, f), ".");
    const size_t pos = key.rfind(marker);
    if (pos == std::string::npos) continue;
    const std::string rest = key.substr(pos + marker.size());  // "weight" or "<name>.weight"
    const size_t dot = rest.find('.');
    if (rest != "weight" &&
        (dot == 0 || dot == std::string::npos || rest.substr(dot) != ".weight")) {
      return false;
    }
    *module_path = key.substr(std::strlen(kKeyPrefix), pos - std::strlen(kKeyPrefix));
    *factor = f;
    return true;
  }
  return false;
}

// Copies a mapped tensor into an owned fp32 tensor (the mapping may be unaligned or go away).
absl::StatusOr<torch::Tensor> ToFloatTensor(const TensorView& v, const std::string& file) {
  torch::ScalarType type;
  switch (v.dtype) {
    case DType::kF32:
      type = torch::kFloat32;
      break;
    case DType::kF16:
      type = torch::kFloat16;
      break;
    case DType::kBF16:
      type = torch::kBFloat16;
      break;
    case DType::kF64:
      type = torch::kFloat64;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": tensor '", v.name, "' has dtype ", DTypeName(v.dtype),
                       "; LoRA weights must be F32, F16, BF16 or F64"));
  }
  if (v.shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": tensor '", v.name, "' has ",
                                                   v.shape.size(), " dimensions; expected 2"));
  }
  torch::Tensor t = torch::empty(v.shape, torch::TensorOptions().dtype(type));
  if (v.nbytes > 0) std::memcpy(t.data_ptr(), v.data, v.nbytes);
  t = t.to(torch::kFloat32);
  if (!torch::isfinite(t).all().item<bool>()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": tensor '", v.name, "' holds NaN or infinite values"));
  }
  return t;
}

// ---- writing a folder atomically ----

// A folder may be replaced only when it is empty or already an adapter: never a user's folder
// that happens to have the name.
bool ReplaceableFolder(const fs::path& folder) {
  std::error_code ec;
  return fs::is_empty(folder, ec) || fs::exists(folder / kConfigFile, ec);
}

// The modules `config` adapts in `model` (path, projection), in the order of the layers, then of
// KnownLoraTargets: those PEFT's get_peft_model wraps.
std::vector<std::pair<std::string, std::string>> AdaptedModules(const ModelConfig& model,
                                                                const LoraConfig& config) {
  std::vector<std::pair<std::string, std::string>> modules;
  for (int64_t layer = 0; layer < model.num_hidden_layers; ++layer) {
    const std::vector<int64_t>& only = config.layers_to_transform;
    const bool listed = only.empty() || std::find(only.begin(), only.end(), layer) != only.end();
    for (const auto& projection : KnownLoraTargets()) {
      std::string module_path = ModulePathFor(layer, projection);
      if (!listed && !config.NamesWholePath(module_path)) continue;
      if (!config.Adapts(module_path)) continue;
      modules.emplace_back(std::move(module_path), projection);
    }
  }
  return modules;
}

}  // namespace

absl::StatusOr<LoraAdapter> LoraAdapter::Init(const ModelConfig& model, const LoraConfig& config,
                                              uint64_t seed) {
  if (auto s = config.Validate(); !s.ok()) return s;
  if (model.num_hidden_layers <= 0 || model.hidden_size <= 0 || model.num_attention_heads <= 0) {
    return absl::InvalidArgumentError("LoraAdapter::Init: the model config has no layers");
  }
  try {
    LoraAdapter adapter;
    adapter.config = config;
    // One generator walked in a fixed order (layer, then the projection order of
    // KnownLoraTargets), so the weights depend on the seed only, not on how targets are listed.
    at::Generator gen = at::detail::createCPUGenerator(seed);
    torch::NoGradGuard no_grad;
    for (const auto& [module_path, projection] : AdaptedModules(model, config)) {
      const Features f = ProjectionFeatures(model, projection);
      // kaiming_uniform_(a=sqrt(5)) on [r, in]: gain sqrt(2 / (1 + 5)), bound
      // gain * sqrt(3 / fan_in) = 1 / sqrt(in_features), as torch.nn.Linear and PEFT.
      const double bound = 1.0 / std::sqrt(static_cast<double>(f.in));
      LoraPair pair;
      pair.a = torch::empty({config.r, f.in}, torch::kFloat32);
      pair.a.uniform_(-bound, bound, gen);
      // B = 0 makes the adapted model equal the base model at step 0.
      pair.b = torch::zeros({f.out, config.r}, torch::kFloat32);
      adapter.layers.emplace(module_path, std::move(pair));
    }
    return adapter;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("LoraAdapter::Init: ", e.what_without_backtrace()));
  }
}

namespace {

// An adapter with per-module ranks and alphas, made one that every module shares: the largest
// rank, the smaller ones padded with zero rows of A and zero columns of B (which add nothing),
// and each module's scaling folded into its B, so that scaling() * B' A' equals the module's own
// scaling * B A. Serving then needs one rank and one scale per adapter.
// Padding a module of rank r to R costs (R - r) * (in + out) more values; an adapter whose ranks
// are far apart (one module of rank 1024, the others 8) would grow from megabytes to gigabytes on
// the host and the GPU. Refused past kMaxPaddingGrowth times its own size, when that is also more
// than kPaddingFloorBytes (fp32).
constexpr int64_t kMaxPaddingGrowth = 4;
constexpr int64_t kPaddingFloorBytes = int64_t{256} << 20;

absl::Status MakeUniform(LoraAdapter& adapter, const PeftModulePatterns& patterns) {
  LoraConfig& c = adapter.config;
  int64_t max_rank = 0, min_rank = std::numeric_limits<int64_t>::max();
  std::string max_path;
  for (const auto& [path, pair] : adapter.layers) {
    if (pair.a.size(0) > max_rank) max_rank = pair.a.size(0), max_path = path;
    min_rank = std::min(min_rank, pair.a.size(0));
  }
  int64_t own = 0, padded = 0;  // values
  for (const auto& [path, pair] : adapter.layers) {
    own += pair.a.numel() + pair.b.numel();
    padded += max_rank * (pair.a.size(1) + pair.b.size(0));
  }
  const int64_t padded_bytes = padded * static_cast<int64_t>(sizeof(float));
  if (padded > kMaxPaddingGrowth * own && padded_bytes > kPaddingFloorBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "'rank_pattern': lorad serves one rank per adapter and pads every module to the largest "
        "(%d, '%s'; the smallest is %d), which would make this adapter %.1f MB instead of %.1f MB "
        "(more than %d times its size): train it with ranks closer together",
        max_rank, max_path, min_rank, padded_bytes / 1e6,
        own * static_cast<double>(sizeof(float)) / 1e6, kMaxPaddingGrowth));
  }
  const double alpha = c.alpha;
  auto module_scaling = [&](const std::string& path, int64_t r) {
    LoraConfig m = c;
    m.r = static_cast<int>(r);
    m.alpha = PatternValue(patterns.alpha, path).value_or(alpha);
    return m.scaling();
  };
  c.r = static_cast<int>(max_rank);
  if (auto s = c.Validate(); !s.ok()) return s;
  for (auto& [path, pair] : adapter.layers) {
    const int64_t r = pair.a.size(0);
    const double factor = module_scaling(path, r) / c.scaling();
    if (r < max_rank) {
      pair.a = torch::cat({pair.a, torch::zeros({max_rank - r, pair.a.size(1)}, pair.a.options())});
      pair.b =
          torch::cat({pair.b, torch::zeros({pair.b.size(0), max_rank - r}, pair.b.options())}, 1);
    }
    if (factor != 1.0) pair.b = pair.b * factor;
  }
  adapter.from_patterns = true;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LoraAdapter> LoraAdapter::ReadPeft(const std::string& folder) {
  std::error_code ec;
  if (!fs::is_directory(folder, ec)) {
    return absl::NotFoundError(
        absl::StrCat("adapter folder '", folder, "' does not exist or is not a directory"));
  }
  const std::string config_path = (fs::path(folder) / kConfigFile).string();
  auto text = ReadRegularFile(config_path, absl::StrCat("'", config_path, "'"));
  if (absl::IsNotFound(text.status())) {
    return absl::NotFoundError(
        absl::StrCat("'", folder, "' is not a PEFT adapter folder: it has no ", kConfigFile));
  }
  if (!text.ok()) return text.status();
  PeftModulePatterns patterns;
  auto config = ParsePeftConfig(*text, config_path, &patterns);
  if (!config.ok()) return config.status();

  const std::string weights_path = (fs::path(folder) / kWeightsFile).string();
  if (!fs::exists(weights_path, ec)) {
    // The weights are there, in a form lorad does not read: not a wrong path (NOT_FOUND).
    if (fs::exists(fs::path(folder) / "adapter_model.bin", ec)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "'", folder, "' has no ", kWeightsFile,
          " (only adapter_model.bin: lorad does not read pickle files; re-save the adapter with "
          "safe_serialization=True)"));
    }
    return absl::NotFoundError(absl::StrCat("'", folder, "' has no ", kWeightsFile));
  }
  // Read, not mapped: the folder is the operator's or a client's, and may be rewritten meanwhile.
  auto file = SafetensorsFile::Open(weights_path, SafetensorsFile::Access::kRead);
  if (!file.ok()) return file.status();

  try {
    LoraAdapter adapter;
    adapter.config = *config;
    std::map<std::string, torch::Tensor> a_factors, b_factors;
    for (const TensorView& v : (*file)->tensors()) {
      std::string path;
      char factor = 0;
      if (!ParsePeftKey(v.name, &path, &factor)) {
        if (absl::EndsWith(v.name, ".bias")) {  // bias: "all" or "lora_only" trained it
          return absl::InvalidArgumentError(absl::StrCat(
              weights_path, ": tensor '", v.name,
              "' is a trained bias (PEFT's bias \"all\" or \"lora_only\"), which lorad does "
              "not serve: train with bias \"none\""));
        }
        if (absl::EndsWith(v.name, "embed_tokens.weight") ||
            absl::EndsWith(v.name, "lm_head.weight")) {
          // PEFT's save_embedding_layers: a resized vocabulary, or trained embeddings.
          return absl::InvalidArgumentError(absl::StrCat(
              weights_path, ": tensor '", v.name, "' is a whole ",
              absl::EndsWith(v.name, "lm_head.weight") ? "lm_head" : "embedding",
              " weight of shape [", absl::StrJoin(v.shape, ", "),
              "] (PEFT saves them when the vocabulary was resized or the embeddings trained): "
              "lorad serves LoRA weights on the base model's own embeddings and head only; for an "
              "adapter whose vocabulary was not resized, re-save it with "
              "save_embedding_layers=False"));
        }
        return absl::InvalidArgumentError(absl::StrCat(
            weights_path, ": tensor '", v.name,
            "' is not a LoRA weight (expected base_model.model.<module>.lora_A.weight or "
            ".lora_B.weight)"));
      }
      auto module = ParseModulePath(path);
      if (!module.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": tensor '", v.name, "': ", module.status().message()));
      }
      if (!Contains(config->target_modules, module->projection)) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": tensor '", v.name, "' adapts ", module->projection,
                         ", which target_modules in ", kConfigFile, " does not list"));
      }
      // PEFT would leave such a tensor unused; serving it would change the output.
      if (!config->TargetNamesInclude(path)) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": tensor '", v.name, "' adapts ", path,
                         ", which target_modules in ", kConfigFile, " does not name (it names ",
                         absl::StrJoin(config->target_names, ", "), ")"));
      }
      if (!patterns.layers.empty() && !Contains(patterns.layers, module->layer) &&
          !config->NamesWholePath(path)) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": tensor '", v.name, "' adapts layer ", module->layer,
                         ", which layers_to_transform in ", kConfigFile, " does not list"));
      }
      if (config->Excludes(path)) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": tensor '", v.name, "' adapts ", path,
                         ", which exclude_modules in ", kConfigFile, " leaves out"));
      }
      auto t = ToFloatTensor(v, weights_path);
      if (!t.ok()) return t.status();
      // A is [r, in], B is [out, r]; the rank side must be the module's r (rank_pattern's, or
      // the config's).
      const int64_t module_r = static_cast<int64_t>(
          PatternValue(patterns.rank, path).value_or(static_cast<double>(config->r)));
      const int64_t rank = factor == 'A' ? t->size(0) : t->size(1);
      if (rank != module_r) {
        return absl::InvalidArgumentError(absl::StrCat(
            weights_path, ": tensor '", v.name, "' has shape ", ShapeString(*t), " but r is ",
            module_r, " in ", kConfigFile,
            factor == 'A' ? " (lora_A is [r, in_features])" : " (lora_B is [out_features, r])"));
      }
      auto& factors = factor == 'A' ? a_factors : b_factors;
      if (!factors.emplace(path, *t).second) {
        return absl::InvalidArgumentError(absl::StrCat(weights_path, ": ", path, " has two lora_",
                                                       std::string(1, factor), " tensors"));
      }
    }
    for (const auto& [path, a] : a_factors) {
      auto b = b_factors.find(path);
      if (b == b_factors.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": ", PeftKey(path, 'A'), " has no matching lora_B tensor"));
      }
      adapter.layers[path] = LoraPair{a, b->second};
    }
    for (const auto& [path, b] : b_factors) {
      if (!a_factors.count(path)) {
        return absl::InvalidArgumentError(
            absl::StrCat(weights_path, ": ", PeftKey(path, 'B'), " has no matching lora_A tensor"));
      }
    }
    if (adapter.layers.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(weights_path, ": holds no LoRA weights"));
    }
    if (!patterns.rank.empty() || !patterns.alpha.empty()) {
      if (auto s = MakeUniform(adapter, patterns); !s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(config_path, ": ", s.message()));
      }
    }
    return adapter;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("reading ", weights_path, ": ", e.what_without_backtrace()));
  }
}

absl::Status LoraAdapter::WritePeft(const std::string& folder) const {
  if (auto s = config.Validate(); !s.ok()) return s;
  if (layers.empty()) return absl::InvalidArgumentError("LoRA adapter has no layers to write");
  // Owned contiguous fp32 CPU copies: the views below point into them.
  std::vector<torch::Tensor> keep;
  std::vector<TensorView> views;
  try {
    for (const auto& [path, pair] : layers) {
      auto module = ParseModulePath(path);
      if (!module.ok()) return module.status();
      if (!Contains(config.target_modules, module->projection)) {
        return absl::InvalidArgumentError(absl::StrCat("LoRA adapter has layer ", path,
                                                       " but target_modules does not list ",
                                                       module->projection));
      }
      for (char factor : {'A', 'B'}) {
        const torch::Tensor& t = factor == 'A' ? pair.a : pair.b;
        const std::string key = PeftKey(path, factor);
        if (!t.defined() || t.dim() != 2 || (factor == 'A' ? t.size(0) : t.size(1)) != config.r) {
          return absl::InvalidArgumentError(absl::StrCat(
              "LoRA tensor ", key, " has shape ", t.defined() ? ShapeString(t) : "(undefined)",
              "; expected ", factor == 'A' ? "[r, in_features]" : "[out_features, r]", " with r ",
              config.r));
        }
        keep.push_back(t.detach().to(torch::kCPU, torch::kFloat32).contiguous());
        TensorView v;
        v.name = key;
        v.dtype = DType::kF32;
        v.shape = keep.back().sizes().vec();
        v.data = static_cast<const uint8_t*>(keep.back().data_ptr());
        v.nbytes = keep.back().nbytes();
        views.push_back(std::move(v));
      }
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("writing adapter ", folder, ": ", e.what_without_backtrace()));
  }

  std::error_code ec;
  fs::path target = fs::absolute(folder, ec).lexically_normal();
  if (!target.has_filename()) target = target.parent_path();  // "out/adapter/"
  const fs::path parent = target.parent_path();
  fs::create_directories(parent, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create folder ", parent.string(), ": ", ec.message()));
  }
  const bool replace = fs::exists(target, ec);
  if (replace && (!fs::is_directory(target, ec) || !ReplaceableFolder(target))) {
    return absl::AlreadyExistsError(absl::StrCat(
        target.string(), " exists and is not an adapter folder; refusing to replace it"));
  }
  std::string temp =
      (parent / absl::StrCat(".", target.filename().string(), ".tmp-XXXXXX")).string();
  if (::mkdtemp(temp.data()) == nullptr) {
    return absl::InternalError(
        absl::StrCat("cannot create a temporary folder in ", parent.string(), ": ", ErrnoText()));
  }
  auto cleanup = [&](absl::Status s) {
    std::error_code ignored;
    fs::remove_all(temp, ignored);
    return s;
  };
  if (auto s = WriteSyncedFile((fs::path(temp) / kConfigFile).string(), PeftConfigJson(config));
      !s.ok()) {
    return cleanup(s);
  }
  if (auto s =
          WriteSafetensors((fs::path(temp) / kWeightsFile).string(), views, {{"format", "pt"}});
      !s.ok()) {
    return cleanup(s);
  }
  if (auto s = SyncPath(temp); !s.ok()) return cleanup(s);
  ::chmod(temp.c_str(), 0755);  // mkdtemp makes it 0700
  if (replace) {
    // Swap in one step so readers see the old adapter or the new one, never neither; the old
    // one then sits at `temp` and is removed.
    if (auto s = ReplaceFolder(temp, target.string()); !s.ok()) return cleanup(s);
  } else if (::rename(temp.c_str(), target.c_str()) != 0) {
    return cleanup(absl::InternalError(
        absl::StrCat("cannot rename ", temp, " to ", target.string(), ": ", ErrnoText())));
  }
  return SyncPath(parent.string());
}

absl::Status LoraAdapter::ValidateAgainst(const ModelConfig& model) const {
  if (auto s = config.Validate(); !s.ok()) return s;
  for (const auto& [path, pair] : layers) {
    auto module = ParseModulePath(path);
    if (!module.ok()) return module.status();
    if (module->layer >= model.num_hidden_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter layer ", path, " does not exist in the base model: it has ",
                       model.num_hidden_layers, " layers (num_hidden_layers), indices 0-",
                       model.num_hidden_layers - 1));
    }
    const Features f = ProjectionFeatures(model, module->projection);
    for (char factor : {'A', 'B'}) {
      const torch::Tensor& t = factor == 'A' ? pair.a : pair.b;
      const std::vector<int64_t> want = factor == 'A' ? std::vector<int64_t>{config.r, f.in}
                                                      : std::vector<int64_t>{f.out, config.r};
      if (t.defined() && t.sizes().vec() == want) continue;
      return absl::InvalidArgumentError(
          absl::StrCat("adapter tensor ", PeftKey(path, factor), " has shape ",
                       t.defined() ? ShapeString(t) : "(undefined)", " but the base model's ",
                       module->projection, " needs [", absl::StrJoin(want, ", "), "] (r ", config.r,
                       "; ", f.why, "): the adapter was made for a different base model"));
    }
  }
  // A module the config targets but the adapter has no weights for: made on a base of fewer
  // layers. PEFT warns ("missing adapter keys") and leaves such modules at their fresh init, so
  // part of the model would run unadapted, silently.
  std::vector<std::string> missing;
  for (const auto& [module_path, projection] : AdaptedModules(model, config)) {
    if (layers.count(module_path) == 0) missing.push_back(module_path);
  }
  if (!missing.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the adapter has no LoRA weights for ", missing.front(),
        missing.size() > 1 ? absl::StrCat(" and ", missing.size() - 1, " more modules") : "",
        ", which its target_modules adapt in this base model (", model.num_hidden_layers,
        " layers): the adapter was made for a different base model (of fewer layers?)"));
  }
  return absl::OkStatus();
}

int64_t LoraAdapter::bytes() const {
  int64_t n = 0;
  for (const auto& [path, pair] : layers) {
    if (pair.a.defined()) n += static_cast<int64_t>(pair.a.nbytes());
    if (pair.b.defined()) n += static_cast<int64_t>(pair.b.nbytes());
  }
  return n;
}

LoraAdapter LoraAdapter::HostCopy() const {
  LoraAdapter copy = *this;  // the config and flags; the tensors are replaced below
  for (auto& [path, pair] : copy.layers) {
    // One copy whether the tensor is on the device or the host (to(kCPU) then clone() copied a
    // device tensor twice).
    pair = {pair.a.detach().to(torch::kCPU, /*non_blocking=*/false, /*copy=*/true),
            pair.b.detach().to(torch::kCPU, /*non_blocking=*/false, /*copy=*/true)};
  }
  return copy;
}

absl::Status LoraAdapter::CopyWeightsFrom(const LoraAdapter& other) {
  torch::NoGradGuard no_grad;
  for (auto& [path, pair] : layers) {
    auto it = other.layers.find(path);
    if (it == other.layers.end() || !it->second.a.sizes().equals(pair.a.sizes()) ||
        !it->second.b.sizes().equals(pair.b.sizes())) {
      return absl::FailedPreconditionError(
          absl::StrCat("no weights of the same shapes for ", path));
    }
  }
  for (auto& [path, pair] : layers) {
    pair.a.copy_(other.layers.at(path).a);
    pair.b.copy_(other.layers.at(path).b);
  }
  return absl::OkStatus();
}

}  // namespace lorad::engine
