// WriteMergedModel: a base model folder with a LoRA adapter merged into its projection weights,
// W + scaling * B A, written as a plain Hugging Face model folder (model.safetensors in the chosen
// 16/32-bit dtype, config.json, tokenizer and generation files copied, with the chat template the
// job trained on where it is not the base folder's: MergedChatTemplate), as PEFT's
// merge_and_unload() + save_pretrained() gives it: transformers loads it without PEFT.
// (tests/e2e/test_training_end_to_end.py compares it with PEFT's merge.)
//
// The merge is computed in fp32 and rounded once to the output dtype, one tensor at a time: the
// export holds one tensor in memory, not the model. The folder is written atomically (a temp
// folder beside it, fsynced files, then a rename; a failed export removes it). A base checkpoint
// already quantized by bitsandbytes is refused: merge into the 16-bit model it came from. A
// folder whose filesystem has no room for the whole export is RESOURCE_EXHAUSTED before anything
// is written (RequireRoom).
#pragma once

#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "engine/lora/lora_adapter.h"

namespace lorad::engine {

// The chat template the merged folder's tokenizer files carry, where not the base folder's own.
struct MergedChatTemplate {
  // A known family (ChatTemplate::PublishedJinja): written as tokenizer_config.json's
  // chat_template and chat_template.jinja. "": the base folder's files as they are.
  std::string family;
  // Its end of turn's token id, added to generation_config.json's eos_token_id (generate stops
  // there, as lorad's Chat does); -1: none to add.
  int32_t end_of_turn_id = -1;
};

// `dtype`: "auto" (each tensor keeps its checkpoint dtype), "bfloat16", "float16" or "float32".
// CANCELLED, with nothing written, soon after `*abandon` turns true (its job cancelled, or the
// daemon stopping: a large model's export takes minutes): between tensors, and once the files are
// written (before they replace `out_folder`).
absl::Status WriteMergedModel(const std::string& base_folder, const LoraAdapter& adapter,
                              const std::string& out_folder, const std::string& dtype,
                              const std::atomic<bool>* abandon = nullptr,
                              const MergedChatTemplate& chat = {});

}  // namespace lorad::engine
