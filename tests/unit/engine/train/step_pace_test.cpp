// StepPace: a job's ETA from its recent steps, and a resumed job's from its checkpoint's.
#include "engine/train/step_pace.h"

#include <gtest/gtest.h>

#include <utility>
#include <vector>

namespace lorad::engine {
namespace {

// The ETA's pace follows the run's recent steps: 800 steps at 1 s, then 3 s a step (serving
// began beside the job): 100 steps later the run's mean was still far off; the window (the last
// 90 steps) has the new pace. What runs between steps (a 30 s set-up, a 120 s evaluation every
// 100 steps) is spread over every step at the run's mean: a window that held an evaluation or
// none no longer swings the ETA.
TEST(StepPaceTest, FollowsTheRecentPaceWithTheTimeBetweenStepsAtItsMean) {
  StepPace pace;
  EXPECT_EQ(pace.SecondsPerStep(0), 0);
  double run = 30;  // the set-up
  for (int i = 0; i < 800; ++i) {
    pace.Add(1);
    run += 1;
  }
  EXPECT_DOUBLE_EQ(pace.SecondsPerStep(run), 1 + 30.0 / 800);
  for (int i = 0; i < 100; ++i) {
    pace.Add(3);
    run += 3;
  }
  EXPECT_DOUBLE_EQ(pace.SecondsPerStep(run), 3 + 30.0 / 900);
  StepPace evaluated;
  run = 0;
  std::vector<double> per_step;
  for (int step = 1; step <= 1000; ++step) {
    evaluated.Add(2);
    run += 2;
    if (step % 100 == 0) run += 120;
    if (step >= 200) per_step.push_back(evaluated.SecondsPerStep(run));
  }
  // The true pace is 3.2 s a step: from the third evaluation on, the figure stays within 13% of
  // it (the mean of what ran between steps grows back to it between evaluations), and within 4%
  // by the tenth; a window with or without an evaluation (0.62x to 1.45x) plays no part.
  for (size_t i = 0; i < per_step.size(); ++i) {
    EXPECT_NEAR(per_step[i], 3.2, 0.42) << "step " << i + 200;
  }
  EXPECT_NEAR(per_step.back(), 3.2, 0.13);
}

// A resumed job's ETA starts from the pace its checkpoint's recent steps had: 100 steps of 2 s
// with 0.5 s between them, then this run's 60 s set-up and first step. Timed from that step
// alone, the pace was the set-up's 62 s a step.
TEST(StepPaceTest, AResumedRunStartsFromTheEarlierRunsPace) {
  std::vector<std::pair<double, double>> earlier;  // (own seconds, elapsed when it ended)
  double elapsed = 1000;
  for (int i = 0; i < 100; ++i) {
    elapsed += 2;
    earlier.emplace_back(2, elapsed);
    elapsed += 0.5;
  }
  StepPace fresh, resumed;
  resumed.Resume(earlier);
  fresh.Add(2);
  resumed.Add(2);
  EXPECT_DOUBLE_EQ(fresh.SecondsPerStep(62), 2 + 60);
  EXPECT_DOUBLE_EQ(resumed.SecondsPerStep(62), 2 + (60 + 99 * 0.5) / 100);
  // A checkpoint of an older lorad records no steps: the run's own pace, as before.
  StepPace unrecorded;
  unrecorded.Resume({});
  unrecorded.Add(2);
  EXPECT_DOUBLE_EQ(unrecorded.SecondsPerStep(62), 2 + 60);
}

}  // namespace
}  // namespace lorad::engine
