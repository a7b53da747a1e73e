#include "engine/lora/merged_model_writer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"
#include "engine/model/chat_template.h"
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

bool IsFloat(DType t) {
  return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16 || t == DType::kF64;
}

DType SafetensorsDType(torch::ScalarType t) {
  if (t == torch::kBFloat16) return DType::kBF16;
  if (t == torch::kHalf) return DType::kF16;
  return DType::kF32;
}

// A JSON object file, or an empty object where there is none.
absl::StatusOr<nlohmann::json> ReadObject(const fs::path& file) {
  std::error_code ec;
  if (!fs::exists(file, ec)) return nlohmann::json::object();
  std::ifstream in(file);
  nlohmann::json object = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!object.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(file.string(), " is not a JSON object"));
  }
  return object;
}

// The job's template into the export's (copied) tokenizer files, as transformers' save_pretrained
// writes a tokenizer's: tokenizer_config.json's chat_template and chat_template.jinja; and its end
// of turn among generation_config.json's EOS ids (made from config.json's where the base has no
// such file).
absl::Status WriteChatTemplate(const fs::path& out, const MergedChatTemplate& chat) {
  const std::string jinja(ChatTemplate::PublishedJinja(chat.family));
  if (jinja.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("no published chat template for '", chat.family,
                                                   "' to write into the export"));
  }
  auto tokenizer_config = ReadObject(out / "tokenizer_config.json");
  if (!tokenizer_config.ok()) return tokenizer_config.status();
  (*tokenizer_config)["chat_template"] = jinja;
  if (auto s = WriteSyncedFile((out / "tokenizer_config.json").string(),
                               tokenizer_config->dump(2) + "\n");
      !s.ok()) {
    return s;
  }
  if (auto s = WriteSyncedFile((out / "chat_template.jinja").string(), jinja); !s.ok()) return s;
  if (chat.end_of_turn_id < 0) return absl::OkStatus();
  auto generation = ReadObject(out / "generation_config.json");
  if (!generation.ok()) return generation.status();
  if (generation->empty()) {
    // None in the base folder: the one transformers makes of config.json
    // (GenerationConfig.from_model_config), with the end of turn added below.
    auto config = ReadObject(out / "config.json");
    if (!config.ok()) return config.status();
    for (const char* key : {"bos_token_id", "eos_token_id", "pad_token_id"}) {
      if (config->contains(key) && !(*config)[key].is_null()) (*generation)[key] = (*config)[key];
    }
  }
  nlohmann::json eos = generation->value("eos_token_id", nlohmann::json());
  if (!eos.is_array())
    eos = eos.is_number_integer() ? nlohmann::json::array({eos}) : nlohmann::json::array();
  if (std::find(eos.begin(), eos.end(), chat.end_of_turn_id) == eos.end()) {
    eos.push_back(chat.end_of_turn_id);
  }
  (*generation)["eos_token_id"] = eos;
  return WriteSyncedFile((out / "generation_config.json").string(), generation->dump(2) + "\n");
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

// What the export writes: the weights planned, their header, config.json and the copied files.
uint64_t ExportBytes(const std::string& base_folder, const std::vector<TensorView>& planned) {
  uint64_t bytes = 64 * 1024;  // config.json and the safetensors header, generously
  for (const TensorView& t : planned) bytes += t.nbytes + 256;
  std::error_code ec;
  for (const char* name : kCopiedFiles) {
    const uintmax_t size = fs::file_size(fs::path(base_folder) / name, ec);
    if (!ec) bytes += size;
  }
  return bytes;
}

absl::Status WriteMergedOrThrow(const std::string& base_folder, const LoraAdapter& adapter,
                                const std::string& out_folder, const std::string& dtype,
                                const std::atomic<bool>* abandon, const MergedChatTemplate& chat) {
  auto out_dtype = OutputDType(dtype);
  if (!out_dtype.ok()) return out_dtype.status();
  auto weights = ModelWeights::Open(base_folder);
  if (!weights.ok()) return weights.status();
  const double scaling = adapter.config.scaling();

  const auto abandoned = [&] {
    return abandon != nullptr && abandon->load()
               ? absl::CancelledError(absl::StrCat("the merged export to ", out_folder,
                                                   " was abandoned (its job was stopped)"))
               : absl::OkStatus();
  };
  // The plan first (every output tensor's name, dtype and shape, and which adapter layer merges
  // into it), checked whole before anything is written; then each tensor is read, merged and
  // written in turn, so the export holds one tensor in memory, not the model.
  std::vector<TensorView> outputs;
  std::map<std::string, const LoraPair*> merges;
  for (const std::string& name : weights->names()) {
    if (weights->IsBitsandbytes4bit(name)) {
      return absl::UnimplementedError(absl::StrCat(
          "'", name, "' in ", base_folder,
          " is quantized by bitsandbytes; merge into the 16-bit model it was made from"));
    }
    const TensorView* view = weights->Find(name);
    TensorView planned;
    planned.name = name;
    planned.shape = view->shape;
    planned.dtype = view->dtype;
    if (IsFloat(view->dtype)) {
      planned.dtype = *out_dtype != torch::ScalarType::Undefined ? SafetensorsDType(*out_dtype)
                      : view->dtype == DType::kF64               ? DType::kF32
                                                                 : view->dtype;
      const std::string module = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0
                                     ? name.substr(0, name.size() - 7)
                                     : "";
      auto pair = adapter.layers.find(module);
      if (pair != adapter.layers.end()) {
        const std::vector<int64_t> delta_shape = {pair->second.b.size(0), pair->second.a.size(1)};
        if (delta_shape != view->shape) {
          return absl::InvalidArgumentError(absl::StrCat(
              "adapter layer '", module, "' does not fit '", name, "' of ", base_folder));
        }
        merges[name] = &pair->second;
      }
    }
    planned.nbytes = static_cast<size_t>(planned.numel()) * DTypeSize(planned.dtype);
    outputs.push_back(std::move(planned));
  }
  const TensorBytesProducer produce = [&](const TensorView& planned,
                                          const TensorBytesSink& write) -> absl::Status {
    if (auto s = abandoned(); !s.ok()) return s;
    const TensorView* view = weights->Find(planned.name);
    if (!IsFloat(view->dtype)) return write(view->data, view->nbytes);
    auto read = weights->Get(planned.name, torch::kFloat, torch::kCPU);
    if (!read.ok()) return read.status();
    torch::Tensor t = *read;
    if (auto merge = merges.find(planned.name); merge != merges.end()) {
      t = t + scaling * torch::matmul(merge->second->b.to(torch::kFloat),
                                      merge->second->a.to(torch::kFloat));
    }
    t = t.to(TorchDType(planned.dtype)).contiguous();
    return write(static_cast<const uint8_t*>(t.data_ptr()), t.nbytes());
  };

  if (auto s = abandoned(); !s.ok()) return s;
  const fs::path out(out_folder);
  const fs::path tmp = out.parent_path() / (out.filename().string() + ".tmp");
  std::error_code ec;
  fs::remove_all(tmp, ec);  // a killed export's
  // Room for it all first: a 16 GB export that fits in 10 GB filled the disk before it failed,
  // under the job database and every other job's checkpoints. (The temp folder is written whole
  // before it replaces an export already there.)
  if (auto room = RequireRoom(out.parent_path().empty() ? "." : out.parent_path().string(),
                              ExportBytes(base_folder, outputs), "the merged model");
      !room.ok()) {
    return room;
  }
  fs::create_directories(tmp, ec);
  if (ec)
    return absl::InternalError(absl::StrCat("cannot create ", tmp.string(), ": ", ec.message()));
  const auto write_files = [&]() -> absl::Status {
    if (auto s = WriteSafetensorsStreaming((tmp / "model.safetensors").string(), outputs,
                                           {{"format", "pt"}}, produce);
        !s.ok()) {
      return s;
    }
    if (auto s = WriteConfig(base_folder, tmp.string(), dtype); !s.ok()) return s;
    for (const char* name : kCopiedFiles) {
      const fs::path from = fs::path(base_folder) / name;
      if (!fs::exists(from, ec)) continue;
      fs::copy_file(from, tmp / name, fs::copy_options::overwrite_existing, ec);
      if (ec) {
        return absl::InternalError(absl::StrCat("cannot copy ", from.string(), ": ", ec.message()));
      }
      if (auto s = SyncPath((tmp / name).string()); !s.ok()) return s;
    }
    if (!chat.family.empty()) {
      if (auto s = WriteChatTemplate(tmp, chat); !s.ok()) return s;
    }
    if (auto s = SyncPath(tmp.string()); !s.ok()) return s;
    // Abandoned while the files were written (minutes for a large model): not published.
    return abandoned();
  };
  // A failed or abandoned export leaves nothing behind, not even the temp folder (a merge that
  // throws, out of memory say, included).
  absl::Status written;
  try {
    written = write_files();
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;  // WriteMergedModel turns it into a status
  }
  if (!written.ok()) {
    fs::remove_all(tmp, ec);
    return written;
  }
  // An export already there (a resumed job, a retry after a full disk) is replaced in one swap
  // where the filesystem can, so the folder never holds neither or half of one.
  absl::Status placed;
  if (fs::exists(out, ec)) {
    placed = ReplaceFolder(tmp.string(), out.string());
  } else if (fs::rename(tmp, out, ec); ec) {
    placed = absl::InternalError(
        absl::StrCat("cannot rename ", tmp.string(), " to ", out.string(), ": ", ec.message()));
  }
  if (!placed.ok()) {
    fs::remove_all(tmp, ec);
    return placed;
  }
  return SyncPath(out.parent_path().empty() ? "." : out.parent_path().string());
}

}  // namespace

absl::Status WriteMergedModel(const std::string& base_folder, const LoraAdapter& adapter,
                              const std::string& out_folder, const std::string& dtype,
                              const std::atomic<bool>* abandon, const MergedChatTemplate& chat) {
  try {
    return WriteMergedOrThrow(base_folder, adapter, out_folder, dtype, abandon, chat);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("merging the adapter: ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("merging the adapter: ", e.what()));
  }
}

}  // namespace lorad::engine
