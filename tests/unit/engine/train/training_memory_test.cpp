// The training memory estimate behaves as the planner relies on: gradient checkpointing and the
// 8-bit optimizer lower it, and activations grow with the tokens of a micro-batch.
#include "engine/train/training_memory.h"

#include <gtest/gtest.h>

#include "engine/model/checkpointed_call.h"

namespace lorad::engine {
namespace {

ModelConfig Llama3_8B() {
  ModelConfig m;
  m.vocab_size = 128256;
  m.hidden_size = 4096;
  m.intermediate_size = 14336;
  m.num_hidden_layers = 32;
  m.num_attention_heads = 32;
  m.num_key_value_heads = 8;
  m.head_dim = 128;
  return m;
}

TEST(TrainingMemoryTest, CheckpointingAndEightBitStatesLowerTheEstimate) {
  TrainingJobConfig c;
  c.micro_batch_size = 2;
  c.max_seq_length = 2048;
  const auto base = EstimateTrainingBytes(Llama3_8B(), c, 2);
  TrainingJobConfig no_ckpt = c;
  no_ckpt.gradient_checkpointing = false;
  EXPECT_GT(EstimateTrainingBytes(Llama3_8B(), no_ckpt, 2).activation_bytes,
            4 * base.activation_bytes);
  // Keeping the last 4 layers' activations costs about 3 more layers' worth than the one
  // layer a checkpointed backward holds at a time; keeping them all is no checkpointing.
  TrainingJobConfig keep4 = c;
  keep4.keep_activations_layers = 4;
  const int64_t one_layer = base.activation_bytes - 31 * int64_t{2 * 2 * 2048 * 4096 * 2};
  EXPECT_GT(EstimateTrainingBytes(Llama3_8B(), keep4, 2).activation_bytes,
            base.activation_bytes + 2 * one_layer);
  TrainingJobConfig keep_all = c;
  keep_all.keep_activations_layers = 99;
  EXPECT_EQ(EstimateTrainingBytes(Llama3_8B(), keep_all, 2).activation_bytes,
            EstimateTrainingBytes(Llama3_8B(), no_ckpt, 2).activation_bytes);
  TrainingJobConfig fp32_adam = c;
  fp32_adam.optimizer = "adamw";
  EXPECT_GT(EstimateTrainingBytes(Llama3_8B(), fp32_adam, 2).lora_bytes, base.lora_bytes);
  TrainingJobConfig longer = c;
  longer.max_seq_length = 4096;
  EXPECT_GT(EstimateTrainingBytes(Llama3_8B(), longer, 2).activation_bytes,
            base.activation_bytes * 19 / 10);
  // r=16 on all seven projections of the 8B shape is 41.9M LoRA parameters (as PEFT counts
  // them): fp32 weight + gradient + two 8-bit moments.
  EXPECT_EQ(base.lora_bytes, int64_t{41943040} * 10);
  // A checkpointed layer's backward keeps its seven dequantized base weights (218M elements at
  // the 8B shape), more than the two at a time of a plain backward.
  EXPECT_GE(base.workspace_bytes, int64_t{218103808} * 2);
  EXPECT_GT(base.workspace_bytes, EstimateTrainingBytes(Llama3_8B(), no_ckpt, 2).workspace_bytes);
}

// A checkpointed layer keeps two [tokens, hidden] tensors on the device (its input and its
// attention half's output); offloaded, it keeps none there (both wait in host memory), but the
// copies out may hold up to kMaxPendingCopyOutBytes and the last tensor on the device until they
// have read them.
TEST(TrainingMemoryTest, OffloadingLeavesNoCheckpointedInputsOnTheDevice) {
  TrainingJobConfig c;
  c.micro_batch_size = 2;
  c.max_seq_length = 2048;
  TrainingJobConfig offloaded = c;
  offloaded.offload_activations = true;
  const int64_t inputs = int64_t{32} * 2 * 2 * 2048 * 4096 * 2;  // 32 layers x 2 bf16 tensors
  EXPECT_EQ(EstimateTrainingBytes(Llama3_8B(), c, 2).activation_bytes -
                EstimateTrainingBytes(Llama3_8B(), offloaded, 2).activation_bytes,
            inputs - kMaxPendingCopyOutBytes - int64_t{2} * 2048 * 4096 * 2);
}

// Checkpointed layers keeping their MLP's gate and up (two [tokens, intermediate] tensors each)
// hold them on the device; offloaded, only the two layers' worth that are back for backward at
// a time. At most every checkpointed layer keeps them.
TEST(TrainingMemoryTest, KeptMlpValuesCountOnTheDeviceUnlessOffloaded) {
  TrainingJobConfig c;
  c.micro_batch_size = 2;
  c.max_seq_length = 2048;
  c.keep_activations_layers = 4;
  const int64_t mlp = int64_t{2} * 4096 * 14336 * 2;
  const int64_t plain = EstimateTrainingBytes(Llama3_8B(), c, 2).activation_bytes;
  TrainingJobConfig kept = c;
  kept.keep_mlp_layers = 10;
  EXPECT_EQ(EstimateTrainingBytes(Llama3_8B(), kept, 2).activation_bytes, plain + 10 * mlp);
  kept.keep_mlp_layers = 99;
  EXPECT_EQ(EstimateTrainingBytes(Llama3_8B(), kept, 2).activation_bytes, plain + 28 * mlp);
  c.offload_activations = true;
  kept.offload_activations = true;
  kept.keep_mlp_layers = 10;
  // (and the copy-out bound's last tensor is a gate or up value, not a layer input)
  EXPECT_EQ(EstimateTrainingBytes(Llama3_8B(), kept, 2).activation_bytes,
            EstimateTrainingBytes(Llama3_8B(), c, 2).activation_bytes + 2 * mlp +
                int64_t{2} * 2048 * (14336 - 4096) * 2);
  // On the host, at most: the 28 checkpointed layers' two inputs (32 MiB each), and the 10
  // layers' gate and up (112 MiB each, in blocks of 128 MiB: torch's pinned blocks are powers of
  // two), twice (smaller batches' blocks stay cached beside the largest's).
  EXPECT_EQ(EstimateTrainingBytes(Llama3_8B(), kept, 2).host_bytes,
            2 * (int64_t{28} * 2 * 2 * 2048 * 4096 * 2 + 10 * 2 * (int64_t{128} << 20)));
  EXPECT_EQ(EstimateTrainingBytes(Llama3_8B(), c, 2).host_bytes,
            2 * int64_t{28} * 2 * 2 * 2048 * 4096 * 2);
  c.offload_activations = false;
  EXPECT_EQ(EstimateTrainingBytes(Llama3_8B(), c, 2).host_bytes, 0);
}

// Packed rows kept apart attend through a [B, T, T] mask with K and V repeated for every query
// head: at 2 x 2048 tokens in bf16, 8 MiB of bool temporaries three times over while the mask is
// built, and 16 MiB of mask plus 64 MiB of repeated K and V for the layer a checkpointed backward
// holds. Through flash attention's segments (flash_packing), the padding of the backward's fp32
// accumulators: 128 rows for each of 2 + 4096 / 64 segments. The classic packing (flash
// attention, no mask) adds nothing.
// Pinned host memory (offloading): a job that needs more than the host has in all is refused,
// naming the fields to change; one that fits the host but not beside the jobs training waits; a
// job that offloads nothing, or a host whose memory is unknown, never waits for it.
TEST(TrainingMemoryTest, PinnedHostMemoryIsRefusedAboveTheHostAndWaitsBesideOtherJobs) {
  TrainingJobConfig c;
  c.micro_batch_size = 2;
  c.max_seq_length = 2048;
  c.offload_activations = true;
  c.keep_mlp_layers = 15;
  const TrainingMemoryEstimate need = EstimateTrainingBytes(Llama3_8B(), c, 2);
  ASSERT_GT(need.host_bytes, 0);
  const int64_t host = 16 * (int64_t{1} << 30);
  ASSERT_LT(need.host_bytes, host);
  EXPECT_EQ(PinnedHostMemoryFits(need, c, host, 0).value(), true);
  EXPECT_EQ(PinnedHostMemoryFits(need, c, host, host - need.host_bytes).value(), true);
  EXPECT_EQ(PinnedHostMemoryFits(need, c, host, host - need.host_bytes + 1).value(), false)
      << "a second offloading job started beside one holding the rest of the host";
  EXPECT_EQ(PinnedHostMemoryFits(need, c, -1, host).value(), true);

  const absl::StatusOr<bool> never = PinnedHostMemoryFits(need, c, need.host_bytes - 1, 0);
  ASSERT_TRUE(absl::IsResourceExhausted(never.status())) << never.status();
  for (const char* field : {"offload_activations", "keep_mlp_layers", "keep_activations_layers"}) {
    EXPECT_NE(never.status().message().find(field), std::string::npos) << never.status();
  }

  TrainingJobConfig kept = c;
  kept.offload_activations = false;
  const TrainingMemoryEstimate on_device = EstimateTrainingBytes(Llama3_8B(), kept, 2);
  EXPECT_EQ(on_device.host_bytes, 0);
  EXPECT_EQ(PinnedHostMemoryFits(on_device, kept, 1, 1).value(), true);
}

// On the CPU a job's memory is the host's: one needing more than the host has in all is refused,
// saying what it needs and what to lower, whatever the budget.
TEST(TrainingMemoryTest, ACpuJobNeedingMoreThanTheHostHasIsRefused) {
  TrainingJobConfig c;
  c.micro_batch_size = 8;
  c.max_seq_length = 4096;
  const TrainingMemoryEstimate need = EstimateTrainingBytes(Llama3_8B(), c, 4);
  EXPECT_TRUE(CpuTrainingMemoryFits(need, c, need.total()).ok());
  EXPECT_TRUE(CpuTrainingMemoryFits(need, c, -1).ok()) << "the host's memory not known";
  const absl::Status never = CpuTrainingMemoryFits(need, c, need.total() - 1);
  ASSERT_TRUE(absl::IsResourceExhausted(never)) << never;
  for (const std::string& part : {DescribeTrainingNeed(need), std::string("this host has"),
                                  std::string("micro_batch_size"), std::string("max_seq_length")}) {
    EXPECT_NE(never.message().find(part), std::string::npos) << never;
  }
}

TEST(TrainingMemoryTest, PackedRowsKeptApartCountTheirMaskOrTheirSegments) {
  TrainingJobConfig c;
  c.micro_batch_size = 2;
  c.max_seq_length = 2048;
  const int64_t plain = EstimateTrainingBytes(Llama3_8B(), c, 2).activation_bytes;
  c.data.packing = true;
  const int64_t mask = int64_t{2} * 2048 * 2048;
  const int64_t held = mask * 2 + int64_t{2} * 2 * 2048 * 32 * 128 * 2;
  EXPECT_EQ(EstimateTrainingBytes(Llama3_8B(), c, 2).activation_bytes, plain + 3 * mask + held);
  const int64_t segments = 2 + 4096 / 64;
  EXPECT_EQ(EstimateTrainingBytes(Llama3_8B(), c, 2, /*flash_packing=*/true).activation_bytes,
            plain + 128 * segments * 32 * (128 + 1) * 4);
  c.data.packing_separate = false;
  EXPECT_EQ(EstimateTrainingBytes(Llama3_8B(), c, 2).activation_bytes, plain);
  EXPECT_EQ(EstimateTrainingBytes(Llama3_8B(), c, 2, true).activation_bytes, plain);
}

// LeavesRoomFor, with a budget of `budget` bytes and a waiting job of `waiting` bytes.
absl::StatusOr<bool> LeavesRoom(std::vector<int64_t> running, int64_t candidate, int64_t waiting,
                                int64_t budget, int max_jobs = 16) {
  std::vector<TrainingHold> holds;
  for (int64_t bytes : running) holds.push_back({bytes, 0});
  return LeavesRoomFor(holds, {candidate, 0}, max_jobs, [&](const TrainingHold& beside) {
    return absl::StatusOr<bool>(waiting + beside.bytes <= budget);
  });
}

// A job may start ahead of one waiting for memory only with what the waiting job could never
// use: with two jobs of 9 running in a budget of 24, a waiting job of 10 starts once either
// ends, beside the other; a candidate of 6 would keep it waiting then (9 + 6 + 10 > 24) although
// it fits beside the waiting job alone, one of 5 would not.
TEST(TrainingMemoryTest, AJobStartsAheadOnlyWithRoomTheWaitingJobCouldNeverUse) {
  EXPECT_FALSE(*LeavesRoom({9, 9}, 6, 10, 24));
  EXPECT_TRUE(*LeavesRoom({9, 9}, 5, 10, 24));
  EXPECT_TRUE(*LeavesRoom({}, 14, 10, 24));
  EXPECT_FALSE(*LeavesRoom({}, 15, 10, 24));
  // Slots: the waiting job needs one beside every set it fits with, the candidate's included.
  EXPECT_TRUE(*LeavesRoom({50}, 40, 60, 100, /*max_jobs=*/2));
  EXPECT_FALSE(*LeavesRoom({50}, 40, 60, 100, /*max_jobs=*/1));
  EXPECT_FALSE(*LeavesRoom({10, 10}, 1, 60, 100, /*max_jobs=*/3)) << "3 running + the waiting one";
  // Pinned host memory counts as well as the budget.
  const auto host_fits = [](const TrainingHold& beside) {
    return absl::StatusOr<bool>(beside.bytes <= 100 && beside.pinned_host_bytes <= 8);
  };
  EXPECT_FALSE(*LeavesRoomFor({{10, 4}}, {10, 5}, 16, host_fits));
  EXPECT_TRUE(*LeavesRoomFor({{10, 4}}, {10, 4}, 16, host_fits));
  // The waiting job's error is the answer.
  const auto refused = LeavesRoomFor({{1, 0}}, {1, 0}, 16, [](const TrainingHold&) {
    return absl::StatusOr<bool>(absl::ResourceExhaustedError("never fits"));
  });
  EXPECT_TRUE(absl::IsResourceExhausted(refused.status())) << refused.status();
}

}  // namespace
}  // namespace lorad::engine
