// RandomState: the state of the default random generators that torch ops draw from (the CPU
// one, and the current CUDA device's), captured and put back. A checkpointed piece replays its
// forward's draws in its recompute with it; a training job keeps its own stream in one, so that
// jobs that take turns on the GPU loop never draw from each other's (LoRA dropout).
// Thread rules: none; it is used on the thread that runs the ops.
#pragma once

#include <torch/torch.h>

namespace lorad::engine {

struct RandomState {
  torch::Tensor cpu;
  torch::Tensor cuda;  // defined when captured with CUDA
  int cuda_device = -1;

  static RandomState Capture(bool with_cuda);
  void Restore() const;
};

}  // namespace lorad::engine
