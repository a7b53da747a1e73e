#include "engine/train/training_memory.h"

#include <algorithm>
#include <string>

#include "engine/model/checkpointed_call.h"

namespace lorad::engine {
namespace {

// [in, out] of each projection LoRA may target.
struct Shape {
  int64_t in;
  int64_t out;
};

Shape ProjectionShape(const ModelConfig& m, const std::string& name) {
  const int64_t q = m.num_attention_heads * m.head_dim;
  const int64_t kv = m.num_key_value_heads * m.head_dim;
  if (name == "q_proj") return {m.hidden_size, q};
  if (name == "k_proj" || name == "v_proj") return {m.hidden_size, kv};
  if (name == "o_proj") return {q, m.hidden_size};
  if (name == "down_proj") return {m.intermediate_size, m.hidden_size};
  return {m.hidden_size, m.intermediate_size};  // gate_proj, up_proj
}

int64_t PowerOfTwoCeil(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

}  // namespace

TrainingMemoryEstimate EstimateTrainingBytes(const ModelConfig& model,
                                             const TrainingJobConfig& config, int64_t element_bytes,
                                             bool flash_packing) {
  TrainingMemoryEstimate e;
  int64_t lora_params = 0;
  for (const std::string& target : config.lora.target_modules) {
    const Shape s = ProjectionShape(model, target);
    lora_params += config.lora.r * (s.in + s.out);
  }
  // Every base projection is dequantized, targeted or not.
  int64_t largest_weight = 0;
  int64_t layer_weights = 0;
  for (const char* name :
       {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}) {
    const Shape s = ProjectionShape(model, name);
    largest_weight = std::max(largest_weight, s.in * s.out);
    layer_weights += s.in * s.out;
  }
  lora_params *= model.num_hidden_layers;
  // fp32 weights and gradients; AdamW keeps two fp32 moments, 8-bit AdamW two bytes (+ scales).
  const int64_t optimizer_per_param = config.optimizer == "adamw" ? 8 : 2;
  e.lora_bytes = lora_params * (4 + 4 + optimizer_per_param);

  const int64_t tokens = config.micro_batch_size * config.max_seq_length;
  const int64_t h = model.hidden_size;
  const int64_t i = model.intermediate_size;
  // One layer's saved tensors in backward: the norms' and attention's inputs and outputs (about
  // ten hidden-sized tensors per token), the MLP's gate, up, their product and its input (four
  // intermediate-sized ones).
  const int64_t layer = tokens * (10 * h + 4 * i) * element_bytes;
  // A checkpointed layer keeps its input and its attention half's output (two hidden-sized
  // tensors per token; LlamaModel::CheckpointedBlock), or with offloading one, on the host.
  const int64_t kept = std::min(model.num_hidden_layers, config.keep_activations_layers);
  const int64_t inputs_kept = config.offload_activations ? 0 : 2;
  e.activation_bytes =
      config.gradient_checkpointing
          ? (model.num_hidden_layers - kept) * inputs_kept * tokens * h * element_bytes +
                std::max<int64_t>(kept, 1) * layer
          : model.num_hidden_layers * layer;
  // Checkpointed layers keeping their MLP's gate and up: on the device each; offloaded, two
  // layers' worth (one in use, the next coming back: CheckpointedCall's prefetch), and any
  // offload's copies out waiting on the device up to their bound.
  const int64_t hidden_value = tokens * h * element_bytes;  // a layer input
  const int64_t mlp_value = tokens * i * element_bytes;     // gate's or up's output
  const int64_t mlp_values = 2 * mlp_value;
  const int64_t kept_mlp =
      config.gradient_checkpointing
          ? std::clamp<int64_t>(config.keep_mlp_layers, 0, model.num_hidden_layers - kept)
          : 0;
  if (config.gradient_checkpointing && config.offload_activations &&
      kept < model.num_hidden_layers) {
    // The bound lets the last copy's tensor wait beside it: a layer input, or a gate or up value.
    const int64_t largest = kept_mlp > 0 ? mlp_value : hidden_value;
    e.activation_bytes +=
        std::min<int64_t>(kept_mlp, 2) * mlp_values + kMaxPendingCopyOutBytes + largest;
    // Each tensor is its own pinned block, which torch's host allocator rounds up to a power of
    // two (a gate or up value at the 8B shape, 112 MiB, takes 128) and keeps cached for reuse
    // until the job ends; batches padded to their longest row vary in size, and each size keeps
    // its own blocks: up to twice the largest size's (1 + 1/2 + 1/4 + ...).
    e.host_bytes = 2 * ((model.num_hidden_layers - kept) * 2 * PowerOfTwoCeil(hidden_value) +
                        kept_mlp * 2 * PowerOfTwoCeil(mlp_value));
  } else {
    e.activation_bytes += kept_mlp * mlp_values;
  }
  // Packed rows kept apart attend through flash attention's variable-length segments
  // (`flash_packing`), whose backward pads its fp32 accumulators by 128 rows a segment (counted
  // for one example per 64 tokens and one per row); or through a mask ([B, T, T]: bool
  // temporaries while it is built, and the copy SDPA makes in the compute dtype) with K and V
  // repeated for every query head (the masked kernel has no grouped-query attention), a layer
  // kept for backward holding the last two (engine/model/attention_cache.h, PackedSequences).
  if (config.data.packing && config.data.packing_separate && flash_packing) {
    const int64_t segments = config.micro_batch_size + tokens / 64;
    const int64_t padded_dim = (model.head_dim + 31) / 32 * 32;
    e.activation_bytes += 128 * segments * model.num_attention_heads * (padded_dim + 1) * 4;
  } else if (config.data.packing && config.data.packing_separate) {
    const int64_t mask = config.micro_batch_size * config.max_seq_length * config.max_seq_length;
    const int64_t held = mask * element_bytes +
                         2 * tokens * model.num_attention_heads * model.head_dim * element_bytes;
    const int64_t holding_layers =
        config.gradient_checkpointing ? std::max<int64_t>(kept, 1) : model.num_hidden_layers;
    e.activation_bytes += 3 * mask + holding_layers * held;
  }
  // A chunk of logits and their gradient: 8 bytes a logit covers fp32, and fp16's fp32 copy
  // (bf16 needs 4).
  const int64_t logits_chunk = std::min(tokens, config.loss_chunk_tokens) * model.vocab_size * 8;
  // Dequantized base weights: a checkpointed layer's recompute keeps all seven for the backward
  // that follows (engine/model/base_linear.cpp); otherwise a projection's forward and backward
  // each dequantize one at a time.
  const int64_t dequantized =
      config.gradient_checkpointing ? layer_weights + largest_weight : 2 * largest_weight;
  e.workspace_bytes = dequantized * element_bytes + logits_chunk + tokens * h * 4;
  return e;
}

absl::StatusOr<bool> PinnedHostMemoryFits(const TrainingMemoryEstimate& need,
                                          const TrainingJobConfig& config, int64_t host_total_bytes,
                                          int64_t held_bytes) {
  if (need.host_bytes <= 0 || host_total_bytes < 0) return true;
  if (need.host_bytes > host_total_bytes) {
    return absl::ResourceExhaustedError(
        "training.offload_activations needs up to " + ReadableBytes(need.host_bytes) +
        " of pinned host memory for this job (the checkpointed layers' inputs" +
        (config.keep_mlp_layers > 0 ? " and the kept MLP values" : "") + ") but the host has " +
        ReadableBytes(host_total_bytes) + " in all; " +
        (config.keep_mlp_layers > 0 ? "lower training.keep_mlp_layers, " : "") +
        "raise training.keep_activations_layers, turn offload_activations off, or lower "
        "training.micro_batch_size or max_seq_length");
  }
  return need.host_bytes <= host_total_bytes - held_bytes;
}

absl::Status CpuTrainingMemoryFits(const TrainingMemoryEstimate& need,
                                   const TrainingJobConfig& config, int64_t host_total_bytes) {
  if (host_total_bytes < 0 || need.total() <= host_total_bytes) return absl::OkStatus();
  return absl::ResourceExhaustedError(
      "the job needs " + DescribeTrainingNeed(need) + " of memory but this host has " +
      ReadableBytes(host_total_bytes) + " in all (lorad trains on the CPU here); " +
      TrainingShrinkHint(config));
}

absl::StatusOr<bool> LeavesRoomFor(
    const std::vector<TrainingHold>& running, const TrainingHold& candidate, int max_jobs,
    const std::function<absl::StatusOr<bool>(const TrainingHold& beside)>& waiting_fits) {
  if (running.size() > 20) return false;
  for (uint32_t set = 0; set < (uint32_t{1} << running.size()); ++set) {
    TrainingHold beside;
    int jobs = 0;
    for (size_t i = 0; i < running.size(); ++i) {
      if ((set >> i & 1) == 0) continue;
      beside.bytes += running[i].bytes;
      beside.pinned_host_bytes += running[i].pinned_host_bytes;
      ++jobs;
    }
    if (jobs + 1 > max_jobs) continue;
    absl::StatusOr<bool> fits = waiting_fits(beside);
    if (!fits.ok()) return fits.status();
    if (!*fits) continue;
    if (jobs + 2 > max_jobs) return false;
    beside.bytes += candidate.bytes;
    beside.pinned_host_bytes += candidate.pinned_host_bytes;
    fits = waiting_fits(beside);
    if (!fits.ok() || !*fits) return fits;
  }
  return true;
}

std::string DescribeTrainingNeed(const TrainingMemoryEstimate& need) {
  return "about " + ReadableBytes(need.total()) + " (LoRA " + ReadableBytes(need.lora_bytes) +
         ", activations " + ReadableBytes(need.activation_bytes) + ", workspace " +
         ReadableBytes(need.workspace_bytes) + ")";
}

std::string TrainingShrinkHint(const TrainingJobConfig& config) {
  return std::string("lower training.micro_batch_size or max_seq_length") +
         (config.gradient_checkpointing ? "" : ", or turn on gradient_checkpointing");
}

}  // namespace lorad::engine
