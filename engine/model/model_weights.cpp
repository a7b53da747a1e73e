#include "engine/model/model_weights.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/json_file.h"
#include "engine/runtime/durable_file.h"
#include "engine/runtime/file_fingerprint.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr const char* kNf4StateSuffix = ".quant_state.bitsandbytes__nf4";
constexpr const char* kFp4StateSuffix = ".quant_state.bitsandbytes__fp4";

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

bool IsFloat(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16 ||
         dtype == DType::kF64;
}

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> OpenShared(const fs::path& path) {
  auto file = SafetensorsFile::Open(path.string());
  if (!file.ok()) return file.status();
  return std::shared_ptr<const SafetensorsFile>(std::move(*file));
}

// Reads the index's weight_map: tensor name -> shard file name (inside the folder).
absl::StatusOr<std::map<std::string, std::string>> ReadIndex(const fs::path& index_path) {
  std::ifstream in(index_path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", index_path.string()));
  std::stringstream text;
  text << in.rdbuf();
  if (auto s = CheckJsonNesting(text.str(), index_path.string()); !s.ok()) return s;
  const auto j = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") ||
      !j["weight_map"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        index_path.string(), ": not a safetensors index (expected {\"weight_map\": {...}})"));
  }
  std::map<std::string, std::string> map;
  for (const auto& [name, file] : j["weight_map"].items()) {
    const std::string f = file.is_string() ? file.get<std::string>() : "";
    // A shard must be a plain file name inside the folder: the index is user data.
    if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..") {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path.string(), ": weight_map entry for '", name,
                       "' is not a file name in the model folder (got ", file.dump(), ")"));
    }
    map[name] = f;
  }
  if (map.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map is empty"));
  }
  return map;
}

}  // namespace

torch::ScalarType TorchDType(DType dtype) {
  switch (dtype) {
    case DType::kF64:
      return torch::kDouble;
    case DType::kF32:
      return torch::kFloat;
    case DType::kF16:
      return torch::kHalf;
    case DType::kBF16:
      return torch::kBFloat16;
    case DType::kI64:
      return torch::kLong;
    case DType::kI32:
      return torch::kInt;
    case DType::kI16:
      return torch::kShort;
    case DType::kI8:
      return torch::kChar;
    case DType::kU8:
      return torch::kByte;
    case DType::kBool:
      return torch::kBool;
  }
  return torch::kByte;
}

absl::StatusOr<ModelWeights> ModelWeights::Open(const std::string& folder) {
  std::error_code ec;
  if (!fs::is_directory(folder, ec)) {
    return absl::NotFoundError(
        absl::StrCat("model folder '", folder, "' does not exist or is not a directory"));
  }
  ModelWeights w;
  w.folder_ = folder;
  const fs::path single = fs::path(folder) / kSingleFile;
  const fs::path index = fs::path(folder) / kIndexFile;
  if (fs::exists(single, ec)) {
    auto file = OpenShared(single);
    if (!file.ok()) return file.status();
    w.files_.push_back(*file);
    for (const TensorView& view : (*file)->tensors()) w.tensors_[view.name] = {*file, &view};
    return w;
  }
  if (!fs::exists(index, ec)) {
    return absl::NotFoundError(absl::StrCat("model folder '", folder, "' has neither ", kSingleFile,
                                            " nor ", kIndexFile,
                                            " (lorad reads safetensors checkpoints only)"));
  }
  auto map = ReadIndex(index);
  if (!map.ok()) return map.status();
  std::map<std::string, std::shared_ptr<const SafetensorsFile>> shards;
  for (const auto& [name, shard] : *map) {
    if (shards.count(shard) != 0) continue;
    const fs::path path = fs::path(folder) / shard;
    if (!fs::exists(path, ec)) {
      return absl::NotFoundError(absl::StrCat(index.string(), " maps '", name, "' to ", shard,
                                              ", which is missing from '", folder,
                                              "' (incomplete download?)"));
    }
    auto file = OpenShared(path);
    if (!file.ok()) return file.status();
    shards[shard] = *file;
    w.files_.push_back(*file);
  }
  // As transformers reads an index that drifted from its shards: a tensor is taken from the shard
  // the index names when that shard has it, else from any listed shard that has it; an entry no
  // shard holds is passed over (a tied lm_head listed but never saved), and a tensor the model
  // needs that no shard holds is an error when it is read.
  for (const auto& [name, shard] : *map) {
    const auto& file = shards.at(shard);
    if (const TensorView* view = file->Find(name)) w.tensors_[name] = {file, view};
  }
  for (const auto& file : w.files_) {
    for (const TensorView& view : file->tensors())
      w.tensors_.try_emplace(view.name, Entry{file, &view});
  }
  return w;
}

std::vector<std::string> ModelWeights::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& [name, entry] : tensors_) out.push_back(name);
  return out;
}

const TensorView* ModelWeights::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : it->second.view;
}

torch::Tensor ModelWeights::Raw(const Entry& entry) {
  const TensorView& v = *entry.view;
  const auto options = torch::TensorOptions().dtype(TorchDType(v.dtype));
  const size_t align = DTypeSize(v.dtype);
  if (v.nbytes == 0) return torch::empty(v.shape, options);
  if (reinterpret_cast<uintptr_t>(v.data) % align == 0) {
    // The deleter holds the file, so the mapping lives as long as any view of it.
    std::shared_ptr<const SafetensorsFile> keep = entry.file;
    return torch::from_blob(
        const_cast<uint8_t*>(v.data), v.shape, [keep](void*) mutable { keep.reset(); }, options);
  }
  // A file whose header is not padded (no standard writer does this): copy to aligned memory.
  torch::Tensor copy = torch::empty(v.shape, options);
  std::memcpy(copy.data_ptr(), v.data, v.nbytes);
  return copy;
}

absl::StatusOr<torch::Tensor> ModelWeights::Get(
    const std::string& name, torch::ScalarType dtype, const torch::Device& device,
    const std::optional<std::vector<int64_t>>& shape) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(
        absl::StrCat("checkpoint in '", folder_, "' has no tensor '", name, "'"));
  }
  const TensorView& v = *it->second.view;
  if (shape && v.shape != *shape) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "' in '", folder_, "' has shape ", ShapeString(v.shape),
                     ", expected ", ShapeString(*shape), " from config.json"));
  }
  if (c10::isFloatingType(dtype) && !IsFloat(v.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' in '", folder_, "' is ",
                                                   DTypeName(v.dtype),
                                                   ", expected a float tensor (F32, BF16, F16)"));
  }
  torch::Tensor raw = Raw(it->second);
  try {
    return raw.to(device, dtype);  // no copy when already right
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("moving tensor '", name, "' to ", device.str(), ": ",
                                            e.what_without_backtrace()));
  }
}

bool ModelWeights::IsBitsandbytes4bit(const std::string& name) const {
  const TensorView* v = Find(name);
  if (v == nullptr) return false;
  // A quant state beside it marks a packed weight of any dtype: bitsandbytes stores the packed
  // bytes as bnb_4bit_quant_storage says (uint8 by default, bf16 for FSDP QLoRA). Without one,
  // uint8 with an absmax beside it (the state is then reported missing).
  return Contains(name + kNf4StateSuffix) || Contains(name + kFp4StateSuffix) ||
         (v->dtype == DType::kU8 && Contains(name + ".absmax"));
}

absl::StatusOr<Nf4Tensor> ModelWeights::GetNf4(const std::string& name,
                                               const std::vector<int64_t>& shape,
                                               const torch::Device& device) const {
  // Every "<name>.*" sibling: the packed weight and its quant state.
  std::map<std::string, torch::Tensor> parts;
  const std::string prefix = name + ".";
  for (auto it = tensors_.lower_bound(name); it != tensors_.end(); ++it) {
    if (it->first != name && it->first.compare(0, prefix.size(), prefix) != 0) break;
    parts[it->first] = Raw(it->second);
  }
  auto nf4 = Nf4Tensor::FromBitsandbytes(parts, name);
  if (!nf4.ok()) {
    return absl::Status(nf4.status().code(),
                        absl::StrCat("'", folder_, "': ", nf4.status().message()));
  }
  if (nf4->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "quantized tensor '", name, "' in '", folder_, "' has shape ", ShapeString(nf4->shape),
        ", expected ", ShapeString(shape), " from config.json"));
  }
  try {
    // On CPU the parts stay views of the mapping (they keep it alive); To copies to a GPU.
    return device.is_cpu() ? *std::move(nf4) : nf4->To(device);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("moving quantized tensor '", name, "' to ",
                                            device.str(), ": ", e.what_without_backtrace()));
  }
}

std::string ModelWeights::Fingerprint() const {
  uint64_t hash = kFnv1aBasis;
  constexpr size_t kSample = 4096;
  for (const std::string& name : names()) {
    const TensorView* t = Find(name);
    MixFnv1a(&hash, name.data(), name.size() + 1);
    const std::string shape =
        absl::StrCat(DTypeName(t->dtype), "[", absl::StrJoin(t->shape, ","), "]");
    MixFnv1a(&hash, shape.data(), shape.size());
    for (size_t start : {size_t{0}, t->nbytes / 2, t->nbytes > kSample ? t->nbytes - kSample : 0}) {
      if (start < t->nbytes) MixFnv1a(&hash, t->data + start, std::min(kSample, t->nbytes - start));
    }
  }
  return absl::StrCat(absl::Hex(hash, absl::kZeroPad16));
}

absl::StatusOr<std::string> ModelFolderFingerprint(const std::string& folder,
                                                   const std::string& weights_fingerprint) {
  namespace fs = std::filesystem;
  uint64_t hash = kFnv1aBasis;
  for (const char* name :
       {"config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja"}) {
    const fs::path path = fs::path(folder) / name;
    std::error_code ec;
    MixFnv1a(&hash, name, std::strlen(name) + 1);
    if (!fs::exists(path, ec)) continue;
    auto bytes = ReadRegularFile(path.string(), name);
    if (!bytes.ok()) return bytes.status();
    MixFnv1a(&hash, bytes->data(), bytes->size());
  }
  MixFnv1a(&hash, weights_fingerprint.data(), weights_fingerprint.size());
  return absl::StrCat(absl::Hex(hash, absl::kZeroPad16));
}

}  // namespace lorad::engine
