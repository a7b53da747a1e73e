// LrSchedule: the learning rate of every optimizer step, with Hugging Face transformers'
// semantics (get_{linear,cosine,constant}_schedule_with_warmup) so loss curves compare 1:1 with a
// transformers/PEFT run. torch-free.
//
//   lr(step) = base_lr * factor(step), step = 0 for the first optimizer step
//   warmup:   factor = step / max(1, warmup_steps)                       for step < warmup_steps
//   linear:   factor = max(0, (total - step) / max(1, total - warmup))
//   cosine:   factor = max(0, 0.5 * (1 + cos(pi * progress))),
//             progress = (step - warmup) / max(1, total - warmup)
//   constant: factor = 1
// As in transformers, the first step of a warmup has learning rate 0.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace lorad::engine {

enum class LrScheduleKind { kLinear, kCosine, kConstant };

// "linear", "cosine", "constant".
absl::StatusOr<LrScheduleKind> LrScheduleKindFromName(const std::string& name);

class LrSchedule {
 public:
  LrSchedule(LrScheduleKind kind, double base_lr, int64_t warmup_steps, int64_t total_steps)
      : kind_(kind), base_lr_(base_lr), warmup_(warmup_steps), total_(total_steps) {}

  double LearningRate(int64_t step) const { return base_lr_ * Factor(step); }
  double Factor(int64_t step) const;

 private:
  LrScheduleKind kind_;
  double base_lr_;
  int64_t warmup_;
  int64_t total_;
};

}  // namespace lorad::engine
