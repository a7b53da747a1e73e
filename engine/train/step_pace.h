// StepPace: how long a training step takes now, for a job's ETA. The run's mean pace stayed wrong
// for as long again after the pace changed (a job that trained alone overnight, then shared the
// GPU with serving at train_share: its ETA was short by up to 1/train_share for hours). The pace
// is taken over the run's recent steps instead: the last tenth of them, at least 50 and at most
// 1000, evaluations and checkpoints between them counted as they come. torch-free.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>

namespace lorad::engine {

class StepPace {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr size_t kMinWindow = 50, kMaxWindow = 1000;

  // A step of this run ended at `at`.
  void Add(Clock::time_point at) {
    times_.push_back(at);
    ++steps_;
    while (times_.size() > kMaxWindow + 1) times_.pop_front();
  }

  // Seconds a step takes: over the window of recent steps once two have ended (the first one's
  // time holds the job's set-up), else `run_seconds` over this run's steps.
  double SecondsPerStep(double run_seconds) const {
    if (times_.size() < 2) return steps_ > 0 ? run_seconds / static_cast<double>(steps_) : 0;
    const size_t window = std::min(
        times_.size() - 1, std::clamp(static_cast<size_t>(steps_ / 10), kMinWindow, kMaxWindow));
    const auto span = times_.back() - times_[times_.size() - 1 - window];
    return std::chrono::duration<double>(span).count() / static_cast<double>(window);
  }

 private:
  std::deque<Clock::time_point> times_;  // the last kMaxWindow + 1 steps' ends
  int64_t steps_ = 0;                    // steps of this run
};

}  // namespace lorad::engine
