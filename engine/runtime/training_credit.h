// TrainingCredit: training's share of the GPU loop while the loop also serves
// (engine.train_share). Inference steps taken while a job trains earn training that share of
// their time; a micro-batch runs while credit is left and is paid for in full.
#pragma once

#include <algorithm>

namespace lorad::engine {

class TrainingCredit {
 public:
  // The most credit training may save up (its burst once it runs): 2 s of micro-batches in a row
  // is already that long without a token for any stream.
  static constexpr double kMaxSavedSeconds = 2.0;

  // `share` in [0, 0.95]: training's least part of the loop's time while it also serves.
  explicit TrainingCredit(double share) : ratio_(share / (1.0 - share)) {}

  // An inference step of `seconds` while a job trains (not while none does, nor while every job
  // waits for storage: credit saved up then went to a burst of micro-batches once one could go
  // on, every stream waiting).
  void Earn(double seconds) { credit_ = std::min(credit_ + seconds * ratio_, kMaxSavedSeconds); }
  // A micro-batch of `seconds`, paid in full: one longer than the credit it had leaves a debt
  // that serving pays back before the next. (A debt capped at 2 s let micro-batches of 5 s take
  // 64% of the loop at a share of 0.3.)
  void Spend(double seconds) { credit_ -= seconds; }
  // No job trains: credit saved up is dropped; a debt stays, for the next job to wait out.
  void DropSaved() { credit_ = std::min(credit_, 0.0); }
  // Whether a micro-batch may run beside serving now.
  bool CanTrain() const { return credit_ > 0; }

 private:
  double ratio_;  // credit earned per second of serving: share / (1 - share)
  double credit_ = 0;
};

}  // namespace lorad::engine
