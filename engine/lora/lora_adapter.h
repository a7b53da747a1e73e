// LoraAdapter: the weights of one LoRA adapter, as data attached to a base model (not a changed
// model), read from and written to PEFT's format so adapters move freely between lorad and PEFT.
//
// PEFT format: a folder with
//   adapter_config.json       {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "lora_dropout": 0,
//                              "target_modules": [...], "use_rslora": false, "bias": "none",
//                              "base_model_name_or_path": ..., "task_type": "CAUSAL_LM", ...}
//   adapter_model.safetensors "base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"
//                             [r, in_features] and "...lora_B.weight" [out_features, r]
// Math (per targeted linear): y = W x + scaling * B (A dropout(x)),
//   scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/lora/lora_config.h"
#include "engine/model/model_config.h"

namespace lorad::engine {

// The two factors of one targeted linear layer.
struct LoraPair {
  torch::Tensor a;  // [r, in_features]
  torch::Tensor b;  // [out_features, r]
};

struct LoraAdapter {
  LoraConfig config;
  // Key: the module path inside the base model, e.g. "model.layers.0.self_attn.q_proj".
  std::map<std::string, LoraPair> layers;
  // Read from a PEFT folder with rank_pattern / alpha_pattern: its modules' ranks and scalings were
  // made one (padded ranks, scaling folded into B; see ReadPeft). Serves exactly; training it
  // further would not follow PEFT's per-module scaling, so the trainer refuses it.
  bool from_patterns = false;

  // PEFT's initialisation for every targeted projection of every layer: A Kaiming-uniform
  // (a = sqrt(5), as torch.nn.Linear), B zeros. fp32 on CPU; deterministic from `seed`.
  static absl::StatusOr<LoraAdapter> Init(const ModelConfig& model, const LoraConfig& config,
                                          uint64_t seed);
  // Reads a PEFT adapter folder. Errors name the folder and the file/key at fault.
  static absl::StatusOr<LoraAdapter> ReadPeft(const std::string& folder);
  // Writes a PEFT adapter folder atomically (temp folder beside it, fsync, rename).
  absl::Status WritePeft(const std::string& folder) const;
  // Checks every layer's shapes against the base model; the error names the tensor, its shape and
  // the shape the base layer needs.
  absl::Status ValidateAgainst(const ModelConfig& model) const;
  int64_t bytes() const;
  // A detached copy on the host (CPU), in the weights' own dtype: what a writer saves while this
  // one goes on training.
  LoraAdapter HostCopy() const;
  // Copies `other`'s weights into this adapter's tensors in place (their device and dtype stay).
  // FailedPrecondition naming the module `other` lacks or holds in another shape.
  absl::Status CopyWeightsFrom(const LoraAdapter& other);
};

}  // namespace lorad::engine
