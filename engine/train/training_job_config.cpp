#include "engine/train/training_job_config.h"

#include "absl/strings/str_cat.h"
#include "engine/train/dataset_reader.h"
#include "engine/train/lr_schedule.h"

namespace lorad::engine {
namespace {

// `field` under the job spec's "training." unless it names its own section ("dataset.").
absl::Status OutOfRange(const std::string& field, const std::string& range, double value) {
  const bool sectioned = field.find('.') != std::string::npos;
  return absl::InvalidArgumentError(
      absl::StrCat(sectioned ? "" : "training.", field, " is ", value, "; it must be ", range));
}

}  // namespace

absl::Status TrainingJobConfig::Validate() const {
  if (data.path.empty()) return absl::InvalidArgumentError("dataset.path is empty");
  if (auto f = DatasetFormatFromName(data.format); !f.ok()) return f.status();
  if (data.validation_fraction < 0 || data.validation_fraction > 0.5) {
    return OutOfRange("dataset.validation_fraction", "in [0, 0.5]", data.validation_fraction);
  }
  if (auto s = lora.Validate(); !s.ok()) return s;
  if (!export_merged_dtype.empty() && export_merged_dtype != "auto" &&
      export_merged_dtype != "bfloat16" && export_merged_dtype != "float16" &&
      export_merged_dtype != "float32") {
    return absl::InvalidArgumentError("export_merged: dtype '" + export_merged_dtype +
                                      "' is not one of auto, bfloat16, float16, float32");
  }
  if (max_steps < 0) return OutOfRange("max_steps", ">= 0 (0: use num_epochs)", max_steps);
  if (max_steps == 0 && !(num_epochs > 0 && num_epochs <= 1000)) {
    return OutOfRange("num_epochs", "in (0, 1000] when max_steps is 0", num_epochs);
  }
  if (micro_batch_size < 1 || micro_batch_size > 1024) {
    return OutOfRange("micro_batch_size", "in [1, 1024]", micro_batch_size);
  }
  if (grad_accum < 1 || grad_accum > 4096)
    return OutOfRange("grad_accum", "in [1, 4096]", grad_accum);
  if (!(learning_rate > 0 && learning_rate <= 1)) {
    return OutOfRange("learning_rate", "in (0, 1]", learning_rate);
  }
  if (auto k = LrScheduleKindFromName(schedule); !k.ok()) return k.status();
  if (warmup_steps < 0) return OutOfRange("warmup_steps", ">= 0", warmup_steps);
  if (!(warmup_ratio >= 0 && warmup_ratio <= 1)) {
    return OutOfRange("warmup_ratio", "in [0, 1]", warmup_ratio);
  }
  if (weight_decay < 0) return OutOfRange("weight_decay", ">= 0", weight_decay);
  if (optimizer != "adamw" && optimizer != "adamw_8bit") {
    return absl::InvalidArgumentError(
        absl::StrCat("training.optimizer is '", optimizer, "'; it must be adamw or adamw_8bit"));
  }
  if (!(adam_beta1 >= 0 && adam_beta1 < 1))
    return OutOfRange("adam_beta1", "in [0, 1)", adam_beta1);
  if (!(adam_beta2 >= 0 && adam_beta2 < 1))
    return OutOfRange("adam_beta2", "in [0, 1)", adam_beta2);
  if (adam_eps < 0) return OutOfRange("adam_eps", ">= 0", adam_eps);
  if (max_seq_length < 2 || max_seq_length > (1 << 20)) {
    return OutOfRange("max_seq_length", "in [2, 1048576]", max_seq_length);
  }
  if (keep_activations_layers < 0) {
    return OutOfRange("keep_activations_layers", ">= 0", keep_activations_layers);
  }
  if (keep_mlp_layers < 0) return OutOfRange("keep_mlp_layers", ">= 0", keep_mlp_layers);
  if (eval_every < 0) return OutOfRange("eval_every", ">= 0", eval_every);
  if (save_every < 0) return OutOfRange("save_every", ">= 0", save_every);
  if (keep_checkpoints < 0) return OutOfRange("keep_checkpoints", ">= 0", keep_checkpoints);
  if (early_stopping_patience < 0) {
    return OutOfRange("early_stopping_patience", ">= 0", early_stopping_patience);
  }
  if (load_best_at_end && eval_every == 0) {
    return absl::InvalidArgumentError(
        "training.load_best_at_end needs training.eval_every > 0 (it picks among evaluations)");
  }
  if (early_stopping_patience > 0 && eval_every == 0) {
    return absl::InvalidArgumentError(
        "training.early_stopping_patience needs training.eval_every > 0 (it counts evaluations)");
  }
  if ((eval_every > 0 || early_stopping_patience > 0) && data.validation_fraction == 0 &&
      data.validation_path.empty()) {
    return absl::InvalidArgumentError(
        "training.eval_every needs a validation split: set dataset.validation_fraction or "
        "dataset.validation_path");
  }
  if (loss_chunk_tokens < 1) return OutOfRange("loss_chunk_tokens", ">= 1", loss_chunk_tokens);
  if (output_dir.empty()) return absl::InvalidArgumentError("training.output_dir is empty");
  return absl::OkStatus();
}

}  // namespace lorad::engine
