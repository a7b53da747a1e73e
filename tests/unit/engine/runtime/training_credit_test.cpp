#include "engine/runtime/training_credit.h"

#include <gtest/gtest.h>

namespace lorad::engine {
namespace {

// Seconds of serving before training may run again after a micro-batch of `micro_batch`
// seconds, with the inference steps `step` seconds long.
double ServingBeforeTheNext(TrainingCredit& credit, double micro_batch, double step) {
  credit.Spend(micro_batch);
  double served = 0;
  while (!credit.CanTrain()) {
    credit.Earn(step);
    served += step;
  }
  return served;
}

// A micro-batch longer than the credit it had is paid back in full: at a share of 0.3, one of
// 5 s is followed by 5 / 0.3 * 0.7 of serving, so training keeps its share. A debt capped at
// 2 s gave it 64% of the loop.
TEST(TrainingCreditTest, ALongMicroBatchIsPaidBackInFull) {
  TrainingCredit credit(0.3);
  credit.Earn(0.01);
  ASSERT_TRUE(credit.CanTrain());
  const double micro_batch = 5.0;
  const double served = ServingBeforeTheNext(credit, micro_batch, 0.01);
  EXPECT_NEAR(served, micro_batch * 0.7 / 0.3, 0.02);
  EXPECT_NEAR(micro_batch / (micro_batch + served), 0.3, 0.001);
}

// Credit saved up is bounded (the burst of micro-batches it buys, every stream waiting), and
// dropped while no job trains; a debt is not.
TEST(TrainingCreditTest, SavedCreditIsBoundedAndDroppedWithoutAJobButADebtStays) {
  TrainingCredit credit(0.5);
  for (int i = 0; i < 1000; ++i) credit.Earn(1.0);
  int micro_batches = 0;
  while (credit.CanTrain()) {
    credit.Spend(0.1);
    ++micro_batches;
  }
  EXPECT_EQ(micro_batches, static_cast<int>(TrainingCredit::kMaxSavedSeconds / 0.1));
  credit.Earn(1.0);
  credit.DropSaved();
  EXPECT_FALSE(credit.CanTrain());
  credit.Spend(3.0);
  credit.DropSaved();
  credit.Earn(2.9);  // at a share of 0.5, 3 s of serving pays back 3 s of training
  EXPECT_FALSE(credit.CanTrain());
  credit.Earn(0.2);
  EXPECT_TRUE(credit.CanTrain());
}

}  // namespace
}  // namespace lorad::engine
