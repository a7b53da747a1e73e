#include "engine/lora/merged_model_writer.h"

#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "engine/model/model_weights.h"
#include "engine/model/safetensors.h"
#include "engine/runtime/durable_file.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;

// Files of a model folder that travel with the merged weights unchanged.
constexpr const char* kCopiedFiles[] = {"generation_config.json",  "tokenizer.model",
                                        "tokenizer.json",          "tokenizer_config.json",
                                        "special_tokens_map.json", "chat_template.jinja"};

// "auto" keeps each tensor's checkpoint dtype (kUndefined here).
absl::StatusOr<torch::ScalarType> OutputDType(const std::string& name) {
  if (name == "auto") return torch::ScalarType::Undefined;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kHalf;
  if (name == "float32") return torch::kFloat;
  return absl::InvalidArgumentError(
      absl::StrCat("merged dtype '", name, "' is not one of bfloat16, float16, float32"));
}

DType SafetensorsDType(torch::ScalarType t) {
  if (t == torch::kBFloat16) return DType::kBF16;
  if (t == torch::kHalf) return DType::kF16;
  return DType::kF32;
}

absl::Status WriteConfig(const std::string& base_folder, const std::string& out,
                         const std::string& dtype) {
  std::ifstream in(base_folder + "/config.json");
  nlohmann::json config = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!config.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(base_folder, "/config.json is not a JSON object"));
  }
  config.erase("quantization_config");
  if (dtype != "auto") {
    config["torch_dtype"] = dtype;
    if (config.contains("dtype")) config["dtype"] = dtype;
  }
  return WriteSyncedFile(out + "/config.json", config.dump(2) + "\n");
}

absl::Status WriteMergedOrThrow(const std::string& base_folder, const LoraAdapter& adapter,
                                const std::string& out_folder, const std::string& dtype,
                                const std::atomic<bool>* abandon) {
  auto out_dtype = OutputDType(dtype);
  if (!out_dtype.ok()) return out_dtype.status();
  auto weights = ModelWeights::Open(base_folder);
  if (!weights.ok()) return weights.status();
  const double scaling = adapter.config.scaling();

  std::vector<torch::Tensor> keep;  // the tensors the views point into
  std::vector<TensorView> views;
  const auto abandoned = [&] {
    return abandon != nullptr && abandon->load()
               ? absl::CancelledError(absl::StrCat("the merged export to ", out_folder,
                                                   " was abandoned (its job was stopped)"))
               : absl::OkStatus();
  };
  for (const std::string& name : weights->names()) {
    if (auto s = abandoned(); !s.ok()) return s;
    if (weights->IsBitsandbytes4bit(name)) {
      return absl::UnimplementedError(absl::StrCat(
          "'", name, "' in ", base_folder,
          " is quantized by bitsandbytes; merge into the 16-bit model it was made from"));
    }
    const TensorView* view = weights->Find(name);
    const bool is_float = view->dtype == DType::kF32 || view->dtype == DType::kF16 ||
                          view->dtype == DType::kBF16 || view->dtype == DType::kF64;
    torch::Tensor t;
    if (is_float) {
      auto read = weights->Get(name, torch::kFloat, torch::kCPU);
      if (!read.ok()) return read.status();
      t = *read;
      const std::string module = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0
                                     ? name.substr(0, name.size() - 7)
                                     : "";
      auto pair = adapter.layers.find(module);
      if (pair != adapter.layers.end()) {
        const torch::Tensor delta =
            torch::matmul(pair->second.b.to(torch::kFloat), pair->second.a.to(torch::kFloat));
        if (delta.sizes() != t.sizes()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "adapter layer '", module, "' does not fit '", name, "' of ", base_folder));
        }
        t = t + scaling * delta;
      }
      const torch::ScalarType target = *out_dtype != torch::ScalarType::Undefined ? *out_dtype
                                       : view->dtype == DType::kF64               ? torch::kFloat
                                                                    : TorchDType(view->dtype);
      t = t.to(target).contiguous();
    } else {
      auto read = weights->Get(name, TorchDType(view->dtype), torch::kCPU);
      if (!read.ok()) return read.status();
      t = read->contiguous();
    }
    keep.push_back(t);
    TensorView v;
    v.name = name;
    v.dtype = is_float ? SafetensorsDType(t.scalar_type()) : view->dtype;
    v.shape = t.sizes().vec();
    v.data = static_cast<const uint8_t*>(t.data_ptr());
    v.nbytes = t.nbytes();
    views.push_back(std::move(v));
  }

  if (auto s = abandoned(); !s.ok()) return s;
  const fs::path out(out_folder);
  const fs::path tmp = out.parent_path() / (out.filename().string() + ".tmp");
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec)
    return absl::InternalError(absl::StrCat("cannot create ", tmp.string(), ": ", ec.message()));
  if (auto s = WriteSafetensors((tmp / "model.safetensors").string(), views, {{"format", "pt"}});
      !s.ok()) {
    return s;
  }
  if (auto s = WriteConfig(base_folder, tmp.string(), dtype); !s.ok()) return s;
  for (const char* name : kCopiedFiles) {
    const fs::path from = fs::path(base_folder) / name;
    if (!fs::exists(from)) continue;
    fs::copy_file(from, tmp / name, fs::copy_options::overwrite_existing, ec);
    if (ec)
      return absl::InternalError(absl::StrCat("cannot copy ", from.string(), ": ", ec.message()));
    if (auto s = SyncPath((tmp / name).string()); !s.ok()) return s;
  }
  if (auto s = SyncPath(tmp.string()); !s.ok()) return s;
  // Abandoned while the files were written (minutes for a large model): not published.
  if (auto s = abandoned(); !s.ok()) {
    fs::remove_all(tmp, ec);
    return s;
  }
  fs::remove_all(out, ec);
  fs::rename(tmp, out, ec);
  if (ec)
    return absl::InternalError(absl::StrCat("cannot rename ", tmp.string(), ": ", ec.message()));
  return SyncPath(out.parent_path().empty() ? "." : out.parent_path().string());
}

}  // namespace

absl::Status WriteMergedModel(const std::string& base_folder, const LoraAdapter& adapter,
                              const std::string& out_folder, const std::string& dtype,
                              const std::atomic<bool>* abandon) {
  try {
    return WriteMergedOrThrow(base_folder, adapter, out_folder, dtype, abandon);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("merging the adapter: ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("merging the adapter: ", e.what()));
  }
}

}  // namespace lorad::engine
