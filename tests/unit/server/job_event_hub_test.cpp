#include "server/job_event_hub.h"

#include <gtest/gtest.h>

#include <vector>

namespace lorad::server {
namespace {

lorad::v1::JobEvent Step(const std::string& job, int64_t step) {
  lorad::v1::JobEvent e;
  e.set_job_id(job);
  e.mutable_step()->set_step(step);
  return e;
}

lorad::v1::JobEvent State(const std::string& job, lorad::v1::JobState state) {
  lorad::v1::JobEvent e;
  e.set_job_id(job);
  e.set_state(state);
  return e;
}

TEST(JobEventHub, DeliversEachJobsEventsToItsSubscribersOnly) {
  JobEventHub hub;
  std::vector<int64_t> a_steps, b_steps;
  const int64_t a =
      hub.Subscribe("a", [&](const lorad::v1::JobEvent& e) { a_steps.push_back(e.step().step()); });
  hub.Subscribe("b", [&](const lorad::v1::JobEvent& e) { b_steps.push_back(e.step().step()); });
  hub.Publish(Step("a", 1));
  hub.Publish(Step("b", 7));
  hub.Unsubscribe(a);
  hub.Publish(Step("a", 2));
  EXPECT_EQ(a_steps, std::vector<int64_t>({1}));
  EXPECT_EQ(b_steps, std::vector<int64_t>({7}));
}

// A WatchJob stream subscribes, then reads the job's history from the store; the job runner stores
// each step and state before publishing it, so an event may arrive live and be in the history too
// (the end-to-end test of two jobs at once saw a step twice). Such events must be recognised.
TEST(JobEventHub, HistoryHoldsTheStepsUpToItsLastAndItsLastStateAgain) {
  WatchHistory history;
  history.last_step = 3;
  history.last_state = lorad::v1::JOB_STATE_RUNNING;
  EXPECT_TRUE(HistoryHolds(history, Step("j", 1)));
  EXPECT_TRUE(HistoryHolds(history, Step("j", 3)));
  EXPECT_FALSE(HistoryHolds(history, Step("j", 4)));
  EXPECT_TRUE(HistoryHolds(history, State("j", lorad::v1::JOB_STATE_RUNNING)));
  EXPECT_FALSE(HistoryHolds(history, State("j", lorad::v1::JOB_STATE_SUCCEEDED)));
  lorad::v1::JobEvent eval;
  eval.mutable_eval()->set_step(2);
  EXPECT_FALSE(HistoryHolds(history, eval));  // the history holds no evaluations

  const WatchHistory empty;  // queued, no step yet
  EXPECT_FALSE(HistoryHolds(empty, Step("j", 1)));
  EXPECT_FALSE(HistoryHolds(empty, State("j", lorad::v1::JOB_STATE_RUNNING)));
}

}  // namespace
}  // namespace lorad::server
