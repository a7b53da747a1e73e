// StepPace: how long a training step takes now, for a job's ETA. The run's mean pace stayed wrong
// for as long again after the pace changed (a job that trained alone overnight, then shared the
// GPU with serving at train_share: its ETA was short by up to 1/train_share for hours). So the
// steps themselves are timed over the run's recent ones (the last tenth, at least 50 and at most
// 1000), and what runs between steps (evaluations, checkpoints) is spread over every step at the
// run's mean: a window that held an evaluation or none swung the ETA between 0.6x and 1.5x.
// A resumed job starts from the pace its checkpoint's recent steps had (Resume): timed from its
// own first step alone, the ETA took that step and the run's set-up for the pace of every step
// left (hours too long for a job with a thousand steps to go). torch-free.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <utility>
#include <vector>

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

  // Before this run's first step: the steps an earlier run recorded, in order, each with its
  // own seconds and the job's training seconds when it ended (as StepMetrics' step_time_s and
  // elapsed_s). They count as steps timed before this run's, and what ran between them as
  // time between steps.
  void Resume(const std::vector<std::pair<double, double>>& steps) {
    if (steps.size() < 2) return;  // no time between steps to be had from one
    for (const auto& [own, elapsed] : steps) {
      recent_.push_back(own);
      if (recent_.size() > kMaxWindow) recent_.pop_front();
    }
    double own_after_first = 0;
    for (size_t i = 1; i < steps.size(); ++i) own_after_first += steps[i].first;
    earlier_steps_ = static_cast<int64_t>(steps.size() - 1);
    earlier_between_ = std::max(0.0, steps.back().second - steps.front().second - own_after_first);
  }

  // Seconds a step takes, the time between steps included, given this run's seconds so far
  // (set-up, steps, evaluations, checkpoints).
  double SecondsPerStep(double run_seconds) const {
    const int64_t steps = steps_ + earlier_steps_;
    if (steps_ == 0 || steps == 0) return 0;
    const size_t window = std::min(
        recent_.size(), std::clamp(static_cast<size_t>(steps / 10), kMinWindow, kMaxWindow));
    double recent = 0;
    for (size_t i = recent_.size() - window; i < recent_.size(); ++i) recent += recent_[i];
    const double between = std::max(0.0, run_seconds - total_step_seconds_) + earlier_between_;
    return recent / static_cast<double>(window) + between / static_cast<double>(steps);
  }

 private:
  std::deque<double> recent_;  // the last kMaxWindow steps' own seconds
  double total_step_seconds_ = 0;
  int64_t steps_ = 0;  // steps of this run
  // Resume's: the earlier run's steps after its first recorded one, and the seconds between them.
  int64_t earlier_steps_ = 0;
  double earlier_between_ = 0;
};

}  // namespace lorad::engine
