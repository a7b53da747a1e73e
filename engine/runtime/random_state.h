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

// Installs `state` in the default generators for a scope and, as the scope ends, captures into it
// what the scope drew: a training job's own stream across its turns on the GPU loop.
class ScopedRandomState {
 public:
  ScopedRandomState(RandomState& state, bool with_cuda) : state_(state), with_cuda_(with_cuda) {
    state_.Restore();
  }
  ~ScopedRandomState() { state_ = RandomState::Capture(with_cuda_); }
  ScopedRandomState(const ScopedRandomState&) = delete;
  ScopedRandomState& operator=(const ScopedRandomState&) = delete;

 private:
  RandomState& state_;
  bool with_cuda_;
};

}  // namespace lorad::engine
