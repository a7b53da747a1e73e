// EstimateTrainingBytes: the device memory a training job adds on top of the loaded base model,
// estimated before it starts, so the engine can refuse a job that cannot fit with a message that
// says how much it needs (DESIGN.md: a memory planner that knows every budget).
//
// The estimate counts, in the compute dtype (2 bytes on the GPU): the LoRA weights, gradients and
// optimizer state (fp32); the decoder-layer inputs kept for backward (gradient checkpointing) or
// every layer's activations (without); one layer's activations during its recomputation; the
// largest dequantized NF4 weight; the loss's logits chunk in fp32; and for packed rows kept apart,
// their attention mask and repeated K and V. It is an estimate: the
// 8B-shape, 2 x 2048-token, r=16 run on an H200 peaked at 8.2 GiB, about 3.0 GiB above its NF4
// base; this gives 3.4 GiB for it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "engine/runtime/device_info.h"  // ReadableBytes
#include "engine/train/training_job_config.h"

namespace lorad::engine {

struct TrainingMemoryEstimate {
  int64_t lora_bytes = 0;        // weights + gradients + optimizer state
  int64_t activation_bytes = 0;  // kept for backward, plus one layer's working set
  int64_t workspace_bytes = 0;   // dequantized base weights, logits chunk
  int64_t total() const { return lora_bytes + activation_bytes + workspace_bytes; }
  // Pinned host memory (not in total()), at most: what offload_activations parks on the host on
  // CUDA, the checkpointed layers' inputs and kept MLP values.
  int64_t host_bytes = 0;
};

// `element_bytes`: 2 for bf16/fp16 compute, 4 for fp32. `flash_packing`: packed rows attend
// through flash attention's variable-length segments (LlamaModel::PacksWithFlash), not a mask.
TrainingMemoryEstimate EstimateTrainingBytes(const ModelConfig& model,
                                             const TrainingJobConfig& config, int64_t element_bytes,
                                             bool flash_packing = false);

// Whether a job's pinned host memory (`need.host_bytes`, offloading on CUDA) fits the host: an
// error naming the fields to change when it never can (more than `host_total_bytes`, the host's
// memory in all), false while the jobs already training hold too much of it (`held_bytes`: their
// host_bytes summed; the job may start when one ends), true otherwise, and when the host's memory
// is not known (host_total_bytes < 0).
absl::StatusOr<bool> PinnedHostMemoryFits(const TrainingMemoryEstimate& need,
                                          const TrainingJobConfig& config, int64_t host_total_bytes,
                                          int64_t held_bytes);

// A job training on the CPU: an error naming the fields to change when its memory (all of
// need.total(), on the host) is more than the host has in all (`host_total_bytes`; not known
// when < 0), whatever the memory budget.
absl::Status CpuTrainingMemoryFits(const TrainingMemoryEstimate& need,
                                   const TrainingJobConfig& config, int64_t host_total_bytes);

// What one job holds of what the planner counts: bytes of the training budget, and pinned host
// bytes (offloading on CUDA; 0 on the CPU).
struct TrainingHold {
  int64_t bytes = 0;
  int64_t pinned_host_bytes = 0;
};

// Whether starting a job that holds `candidate` beside jobs holding `running` can never delay a
// job that waits, however the running ones end: for every set S of them beside which
// `waiting_fits(S's holds summed)` with a slot of `max_jobs` left, it also fits beside S and the
// candidate with a slot left. (The largest such S decide: what the candidate holds must be room
// the waiting job could never have used.) An error of waiting_fits is the answer. Tries every
// subset: more than 20 running jobs answer false (max_training_jobs is at most 16).
absl::StatusOr<bool> LeavesRoomFor(
    const std::vector<TrainingHold>& running, const TrainingHold& candidate, int max_jobs,
    const std::function<absl::StatusOr<bool>(const TrainingHold& beside)>& waiting_fits);

// What EstimateTrainingBytes says a job needs, in words: "about <total> (LoRA .., activations
// .., workspace ..)".
std::string DescribeTrainingNeed(const TrainingMemoryEstimate& need);

// What makes a job smaller, for the messages of jobs that cannot fit.
std::string TrainingShrinkHint(const TrainingJobConfig& config);

}  // namespace lorad::engine
