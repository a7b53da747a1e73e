// TrainingJobConfig: everything one QLoRA SFT job needs, as plain values. torch-free: the server
// fills it from a JobSpec (proto) and validates it at submit time with Validate(); the Trainer
// reads it. Defaults are the notebook recipe users run today (Unsloth / TRL SFTTrainer + PEFT):
// r=16, alpha=16, dropout 0, all seven projections, lr 2e-4, linear schedule, warmup 5,
// batch 2 x grad_accum 4, weight decay 0.01, 8-bit AdamW.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "engine/lora/lora_config.h"

namespace lorad::engine {

struct TrainingDataConfig {
  std::string path;  // JSONL or JSON array (see dataset_reader.h)
  // Non-empty when `path` holds a request's inline records: what errors call them
  // (DatasetReaderOptions::inline_name).
  std::string inline_name;
  std::string format = "auto";  // auto | alpaca | chat | completion | text | qa
  // How conversations become text (example_formatter.h): "auto" (Alpaca records -> alpaca, other
  // conversations -> the model's chat template, or alpaca when the model has none), "alpaca",
  // "chat" (the model's chat template), "raw" (prompt + response, no template), or a chat
  // template family by name (chatml, llama3, llama2, mistral).
  std::string template_name = "auto";
  // The operator's model.chat_template (EngineOptions::chat_template), which "auto" and "chat"
  // take as the model's own: set by the engine, not by the job.
  std::string model_chat_template;
  bool response_only = true;  // loss on the assistant's tokens only; false: on every token
  bool packing = false;       // pack several short examples into one row of max_seq_length
  // With packing: each packed example attends only to itself, its positions start at 0 and its
  // first token is not predicted from the example before (TRL's padding-free packing); false:
  // they attend to each other and positions run on (the classic constant-length packing).
  bool packing_separate = true;
  bool skip_bad_lines = false;
  // `path` (unless it holds inline records) and `validation_path` were resolved when the job was
  // checked (no symlink in them): they are opened without following any
  // (DatasetReaderOptions::no_symlinks).
  bool resolved_paths = false;
  bool shuffle = true;               // reshuffle every epoch from the job's seed
  double validation_fraction = 0.0;  // [0, 0.5]: held out from `path` after a seeded shuffle
  std::string validation_path;       // a separate validation file (overrides the fraction)
};

// Whether a job's template (TrainingDataConfig::template_name, or a JobSpec's, where "" is "auto")
// takes the model's own chat template, and so the operator's model.chat_template.
inline bool TakesModelsOwnTemplate(const std::string& template_name) {
  return template_name.empty() || template_name == "auto" || template_name == "chat";
}

struct TrainingJobConfig {
  TrainingDataConfig data;
  LoraConfig lora;
  // A PEFT adapter folder to start from instead of a fresh PEFT-style initialisation (parity
  // tests load the same initial weights on both sides; users continue an adapter).
  std::string init_adapter_path;
  // What its files held when the job was submitted (PeftFolderFingerprint); not empty: a folder
  // that holds other files when the job starts afresh fails it (its settings were taken from
  // those files).
  std::string init_adapter_fingerprint;

  // Length: max_steps optimizer steps when > 0, else num_epochs passes over the training split.
  int64_t max_steps = 0;
  double num_epochs = 1.0;
  int64_t micro_batch_size = 2;
  int64_t grad_accum = 4;  // micro-batches per optimizer step
  double learning_rate = 2e-4;
  std::string schedule = "linear";  // linear | cosine | constant (lr_schedule.h)
  int64_t warmup_steps = 5;
  // > 0: warmup is ceil(warmup_ratio * total steps) instead of warmup_steps (transformers'
  // TrainingArguments.warmup_ratio).
  double warmup_ratio = 0;
  double weight_decay = 0.01;
  double max_grad_norm = 1.0;            // <= 0: no clipping (the norm is still reported)
  std::string optimizer = "adamw_8bit";  // adamw | adamw_8bit
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_eps = 1e-8;
  int64_t max_seq_length = 2048;
  // Recompute each decoder layer's activations in backward instead of keeping them (per-layer
  // gradient checkpointing, ForwardOptions::checkpoint_layers): one more forward per step for
  // activations of one layer at a time.
  bool gradient_checkpointing = true;
  // With gradient_checkpointing on CUDA: the checkpointed layer inputs wait for backward in pinned
  // host memory (Unsloth's "unsloth" mode), freeing that device memory.
  bool offload_activations = false;
  // With gradient_checkpointing: the last N decoder layers keep their activations instead
  // (ForwardOptions::checkpoint_skip_last), so backward skips their recompute. Each costs one
  // layer's activations and saves its recompute: at Llama-3-8B shapes and 2 x 2048 tokens about
  // 0.35 GiB and 2 ms of a 343 ms step per layer
  // (bench/results/2026-12-04-h200-trainer-8b-ab-checkpoint-halves.txt).
  int64_t keep_activations_layers = 0;
  // With gradient_checkpointing: this many of the checkpointed layers (spread evenly) keep their
  // MLP's gate and up outputs (ForwardOptions::checkpoint_keep_mlp), so backward skips those two
  // products' recompute. With offload_activations they wait in pinned host memory (235 MB a layer
  // at Llama-3-8B shapes and 2 x 2048 tokens; two layers' worth on the device while they come
  // back for backward); otherwise they stay on the device.
  int64_t keep_mlp_layers = 0;
  uint64_t seed = 3407;

  int64_t eval_every = 0;               // optimizer steps between validation runs; 0: never
  int64_t save_every = 0;               // optimizer steps between checkpoints; 0: only the end
  int64_t keep_checkpoints = 2;         // newest checkpoints kept on disk; 0: all
  int64_t early_stopping_patience = 0;  // evals without a better validation loss; 0: off
  // Publish the adapter of the best evaluation (kept as <output_dir>/best-adapter, written with
  // the checkpoint after an evaluation that improves), not the last step's; needs eval_every.
  bool load_best_at_end = false;
  // Rows of the loss computed at once: full-vocabulary fp32 logits exist for this many
  // positions at a time only.
  int64_t loss_chunk_tokens = 1024;

  // Checkpoints go to <output_dir>/checkpoint-<step>/, the final adapter to
  // <output_dir>/adapter/ (a PEFT folder). With resume, the newest complete checkpoint in
  // output_dir is continued from.
  std::string output_dir;
  // Also write <output_dir>/merged/: the base with the adapter merged in, as a model folder
  // transformers loads ("auto" = the checkpoint's own dtype, "bfloat16", "float16",
  // "float32"); "" = no merged export.
  std::string export_merged_dtype;
  bool resume = true;
  // A checkpoint, or the end's files, that could not be written (a full disk, a folder that
  // cannot be written) do not fail the job: it holds its state, reports a kWarning, and tries
  // again after this wait, doubled after each failure up to storage_retry_max_s. Not part of the
  // job spec (tests shorten it).
  double storage_retry_s = 5;
  double storage_retry_max_s = 60;

  // Every field in range; the error names the field and the allowed range. Does not touch the
  // file system (the server checks paths against its roots first).
  absl::Status Validate() const;
};

}  // namespace lorad::engine
