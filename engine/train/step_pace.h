// StepPace: how long a training step takes now, for a job's ETA. The run's mean pace stayed wrong
// for as long again after the pace changed (a job that trained alone overnight, then shared the
// GPU with serving at train_share: its ETA was short by up to 1/train_share for hours). So the
// steps themselves are timed over the run's recent ones (the last tenth, at least 50 and at most
// 1000), and what runs between steps (evaluations, checkpoints) is spread over every step at the
// run's mean: a window that held an evaluation or none swung the ETA between 0.6x and 1.5x.
// torch-free.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>

namespace lorad::engine {

class StepPace {
 public:
  static constexpr size_t kMinWindow = 50, kMaxWindow = 1000;

  // A step of this run took `step_seconds` (its own work, not the evaluation or checkpoint
  // after it).
  void Add(double step_seconds) {
    recent_.push_back(step_seconds);
    if (recent_.size() > kMaxWindow) recent_.pop_front();
    total_step_seconds_ += step_seconds;
    ++steps_;
  }

  // Seconds a step takes, the time between steps included, given this run's seconds so far
  // (set-up, steps, evaluations, checkpoints).
  double SecondsPerStep(double run_seconds) const {
    if (steps_ == 0) return 0;
    const size_t window = std::min(
        recent_.size(), std::clamp(static_cast<size_t>(steps_ / 10), kMinWindow, kMaxWindow));
    double recent = 0;
    for (size_t i = recent_.size() - window; i < recent_.size(); ++i) recent += recent_[i];
    const double between = std::max(0.0, run_seconds - total_step_seconds_);
    return recent / static_cast<double>(window) + between / static_cast<double>(steps_);
  }

 private:
  std::deque<double> recent_;  // the last kMaxWindow steps' own seconds
  double total_step_seconds_ = 0;
  int64_t steps_ = 0;  // steps of this run
};

}  // namespace lorad::engine
