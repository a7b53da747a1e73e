// ModelWeights: the tensors of a Hugging Face model folder, memory-mapped, handed out as torch.
//
// A folder holds either model.safetensors, or shards model-0000N-of-0000M.safetensors listed by
// model.safetensors.index.json ({"weight_map": {tensor name: shard file}}). Open validates the
// index (every shard it names exists and holds the tensors the index maps to it) before any
// tensor is read, so a broken download is an error naming the file, never a crash mid-load.
//
// Tensors come out zero-copy where possible: a CPU tensor of the checkpoint's own dtype, aligned
// in the file, is a torch::from_blob view of the mapping that keeps the mapping alive. Such a view
// is read-only memory (an in-place write faults): base weights are immutable after load
// (DESIGN.md), and everything that might write gets a converted copy. Other dtypes or devices
// are converted (bf16/fp16/fp32 checkpoints to the compute dtype).
//
// bitsandbytes pre-quantized checkpoints (a "<x>.weight" stored uint8 beside
// "<x>.weight.quant_state.bitsandbytes__nf4", ".absmax", ...) are recognised per tensor and read
// through Nf4Tensor::FromBitsandbytes.
//
// Thread-safety: const methods may be called from any thread.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/nf4_tensor.h"
#include "engine/model/safetensors.h"

namespace lorad::engine {

class ModelWeights {
 public:
  // Opens <folder>/model.safetensors or the shards its index lists. Errors name the folder and
  // the file or tensor at fault.
  static absl::StatusOr<ModelWeights> Open(const std::string& folder);

  const std::string& folder() const { return folder_; }
  // Every tensor name, sorted.
  std::vector<std::string> names() const;
  bool Contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // The raw view (dtype, shape, bytes) or nullptr.
  const TensorView* Find(const std::string& name) const;

  // Tensor `name` as `dtype` on `device`. `shape` (when given) must match exactly; errors name
  // the tensor, its shape and the expected one, and the folder. Only float checkpoints convert
  // to a float dtype (an integer tensor asked as float is an error, not a silent cast).
  absl::StatusOr<torch::Tensor> Get(const std::string& name, torch::ScalarType dtype,
                                    const torch::Device& device,
                                    const std::optional<std::vector<int64_t>>& shape = {}) const;

  // Every tensor by its name, dtype, shape and 4 KiB of its bytes at its start, middle and end:
  // an 8B model in milliseconds; another checkpoint of the same shapes (a fine-tune, another
  // revision) differs there.
  std::string Fingerprint() const;

  // True when `name` is a bitsandbytes 4-bit weight (uint8 with a quant_state sibling).
  bool IsBitsandbytes4bit(const std::string& name) const;
  // Reads such a weight onto `device`; `shape` [out, in] must match its quant state's shape.
  absl::StatusOr<Nf4Tensor> GetNf4(const std::string& name, const std::vector<int64_t>& shape,
                                   const torch::Device& device) const;

 private:
  struct Entry {
    std::shared_ptr<const SafetensorsFile> file;
    const TensorView* view = nullptr;
  };
  // The view as a CPU tensor of its own dtype: zero-copy when aligned, else a copy.
  static torch::Tensor Raw(const Entry& entry);

  std::string folder_;
  std::vector<std::shared_ptr<const SafetensorsFile>> files_;
  std::map<std::string, Entry> tensors_;
};

// safetensors dtype -> torch dtype (every DType has one).
torch::ScalarType TorchDType(DType dtype);

// What a base model folder holds, to tell whether a job resumes on the base it was trained on:
// config.json and the tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json,
// special_tokens_map.json, chat_template.jinja) whole, read as regular files only, and
// `weights_fingerprint` (ModelWeights::Fingerprint of the weights loaded from it). Where the
// folder is plays no part (a moved folder is the same model). Not a defence against a crafted
// file.
absl::StatusOr<std::string> ModelFolderFingerprint(const std::string& folder,
                                                   const std::string& weights_fingerprint);

}  // namespace lorad::engine
