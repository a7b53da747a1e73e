#include "engine/infer/batch_scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>

namespace lorad::engine {
namespace {

ScheduledSequence Seq(SequenceId id, int64_t prompt, int64_t computed = 0,
                      std::string adapter = "") {
  ScheduledSequence seq;
  seq.id = id;
  seq.adapter = std::move(adapter);
  seq.prompt_tokens = prompt;
  seq.computed_tokens = computed;
  return seq;
}

TEST(BatchScheduler, AdmitsInArrivalOrderWithinTheTokenBudgetAndChunksLongPrompts) {
  KvBlockAllocator kv(100, 16);
  SchedulerLimits limits;
  limits.token_budget = 100;
  limits.prefill_chunk = 64;
  auto plan = PlanStep({}, {Seq(1, 30), Seq(2, 200), Seq(3, 5)}, kv, limits);
  EXPECT_EQ(plan.admitted, (std::vector<SequenceId>{1, 2, 3}));
  ASSERT_EQ(plan.prefill.size(), 3u);
  EXPECT_EQ(plan.prefill[0], std::make_pair(SequenceId{1}, int64_t{30}));
  EXPECT_EQ(plan.prefill[1], std::make_pair(SequenceId{2}, int64_t{64}));  // chunked
  EXPECT_EQ(plan.prefill[2], std::make_pair(SequenceId{3}, int64_t{5}));
  EXPECT_EQ(plan.tokens, 99);
}

TEST(BatchScheduler, RunningSequencesDecodeFirstThenPrefillContinues) {
  KvBlockAllocator kv(100, 16);
  ASSERT_TRUE(kv.Reserve(1, 11).ok());
  ASSERT_TRUE(kv.Reserve(2, 201).ok());
  SchedulerLimits limits;
  limits.token_budget = 50;
  auto plan = PlanStep({Seq(1, 10, 10), Seq(2, 200, 64)}, {Seq(3, 8)}, kv, limits);
  EXPECT_EQ(plan.decode, (std::vector<SequenceId>{1}));
  ASSERT_EQ(plan.prefill.size(), 1u);  // the budget is spent on sequence 2's next chunk
  EXPECT_EQ(plan.prefill[0], std::make_pair(SequenceId{2}, int64_t{49}));
  EXPECT_TRUE(plan.admitted.empty());
}

TEST(BatchScheduler, FullKvPoolPreemptsTheLatestArrivalInsteadOfFailing) {
  KvBlockAllocator kv(/*num_blocks=*/4, /*block_size=*/4);
  ASSERT_TRUE(kv.Reserve(1, 8).ok());  // 2 blocks, full: its next token needs a third
  ASSERT_TRUE(kv.Reserve(2, 8).ok());  // 2 blocks, full
  SchedulerLimits limits;
  auto plan = PlanStep({Seq(1, 5, 8), Seq(2, 5, 8)}, {Seq(3, 2)}, kv, limits);
  EXPECT_EQ(plan.preempted, (std::vector<SequenceId>{2}));
  EXPECT_EQ(plan.decode, (std::vector<SequenceId>{1}));
  EXPECT_TRUE(plan.admitted.empty());  // memory is short: nothing new this iteration
}

TEST(BatchScheduler, WaitingRequestWaitsWhenThePoolIsFull) {
  KvBlockAllocator kv(4, 4);
  ASSERT_TRUE(kv.Reserve(1, 12).ok());  // 3 of 4 blocks
  SchedulerLimits limits;
  auto plan = PlanStep({Seq(1, 10, 10)}, {Seq(2, 20), Seq(3, 1)}, kv, limits);
  EXPECT_EQ(plan.decode, (std::vector<SequenceId>{1}));
  // Request 2 needs 6 blocks; FIFO keeps request 3 behind it rather than starving it.
  EXPECT_TRUE(plan.admitted.empty());
}

TEST(BatchScheduler, AdapterLimitSkipsOnlyTheRequestsOverIt) {
  KvBlockAllocator kv(100, 16);
  SchedulerLimits limits;
  limits.max_adapters_per_batch = 2;
  auto plan = PlanStep({Seq(1, 4, 4, "a")},
                       {Seq(2, 4, 0, "b"), Seq(3, 4, 0, "c"), Seq(4, 4, 0, ""), Seq(5, 4, 0, "a")},
                       kv, limits);
  EXPECT_EQ(plan.admitted, (std::vector<SequenceId>{2, 4, 5}));
}

// A request skipped for the adapter limit may be passed over max_passed_over times; then nothing
// behind it is admitted until it fits.
TEST(BatchScheduler, ARequestPassedOverForTheAdapterLimitGetsItsTurn) {
  KvBlockAllocator kv(100, 16);
  SchedulerLimits limits;
  limits.max_adapters_per_batch = 1;
  limits.max_passed_over = 2;
  ScheduledSequence other = Seq(2, 4, 0, "b");
  auto plan =
      PlanStep({Seq(1, 4, 4, "a")}, {other, Seq(3, 4, 0, "a"), Seq(4, 4, 0, "")}, kv, limits);
  EXPECT_EQ(plan.admitted, (std::vector<SequenceId>{3, 4}));
  EXPECT_EQ(plan.passed_over, (std::vector<SequenceId>{2}));
  other.passed_over = 2;
  plan = PlanStep({Seq(1, 4, 4, "a")}, {other, Seq(3, 4, 0, "a"), Seq(4, 4, 0, "")}, kv, limits);
  EXPECT_TRUE(plan.admitted.empty()) << "the requests behind it passed it again";
  EXPECT_TRUE(plan.passed_over.empty());
  plan = PlanStep({}, {other, Seq(3, 4, 0, "a")}, kv, limits);  // the batch drained of 'a'
  EXPECT_EQ(plan.admitted, (std::vector<SequenceId>{2}));
}

TEST(BatchScheduler, MaxRunningBoundsAdmission) {
  KvBlockAllocator kv(100, 16);
  SchedulerLimits limits;
  limits.max_running = 2;
  auto plan = PlanStep({Seq(1, 4, 4)}, {Seq(2, 4), Seq(3, 4)}, kv, limits);
  EXPECT_EQ(plan.admitted, (std::vector<SequenceId>{2}));
}

ScheduledSequence From(std::string client, SequenceId id, int64_t computed = 0,
                       bool preempted = false) {
  ScheduledSequence seq = Seq(id, 4, computed);
  seq.client = std::move(client);
  seq.preempted = preempted;
  return seq;
}

// One client's burst does not hold back another's request: a client's waiting requests come at
// its running ones plus their place among its own; one client alone keeps arrival order.
TEST(BatchScheduler, WaitingRequestsAreAdmittedByTheirClientsShare) {
  KvBlockAllocator kv(100, 16);
  SchedulerLimits limits;
  limits.max_running = 4;
  // a runs 2 and waits with 3 more; b's one request came last.
  const std::vector<ScheduledSequence> running = {From("a", 1, 4), From("a", 2, 4)};
  auto plan =
      PlanStep(running, {From("a", 3), From("a", 4), From("a", 5), From("b", 6)}, kv, limits);
  EXPECT_EQ(plan.admitted, (std::vector<SequenceId>{6, 3}));
  // b running 1 and waiting 2 more beside a's 3: they take turns, a's first at its share of 2.
  limits.max_running = 8;
  plan = PlanStep({From("a", 1, 4), From("a", 2, 4), From("b", 3, 4)},
                  {From("a", 4), From("a", 5), From("b", 6), From("b", 7)}, kv, limits);
  EXPECT_EQ(plan.admitted, (std::vector<SequenceId>{6, 4, 7, 5}));
  // A preempted request comes back first, whoever sent it.
  limits.max_running = 3;
  plan = PlanStep(running, {From("b", 6), From("a", 3, 0, /*preempted=*/true)}, kv, limits);
  EXPECT_EQ(plan.admitted, (std::vector<SequenceId>{3}));
  // One client: arrival order.
  plan = PlanStep({}, {From("a", 3), From("a", 4)}, kv, limits);
  EXPECT_EQ(plan.admitted, (std::vector<SequenceId>{3, 4}));
}

// The client's share does not undo the adapter limit's turn: a request of a client with a stream
// running, skipped for the limit while other clients' requests on the batch's adapter keep
// coming (each at share 0, ahead of it), counts as passed over, and at max_passed_over comes
// first and holds the line. It waited until its own client's stream ended (3000 steps in a
// simulation, 6 before the share).
TEST(BatchScheduler, AClientsShareDoesNotStarveARequestPassedOverForTheAdapterLimit) {
  KvBlockAllocator kv(100, 16);
  SchedulerLimits limits;
  limits.max_adapters_per_batch = 1;
  limits.max_passed_over = 2;
  ScheduledSequence a_stream = From("a", 1, 4);
  a_stream.adapter = "y";
  ScheduledSequence mine = From("a", 2);
  mine.adapter = "z";
  ScheduledSequence theirs = From("b", 3);
  theirs.adapter = "y";
  auto plan = PlanStep({a_stream}, {mine, theirs}, kv, limits);
  EXPECT_EQ(plan.admitted, (std::vector<SequenceId>{3}));
  EXPECT_EQ(plan.passed_over, (std::vector<SequenceId>{2}));
  mine.passed_over = 2;
  plan = PlanStep({a_stream}, {mine, theirs}, kv, limits);
  EXPECT_TRUE(plan.admitted.empty()) << "its turn: the other client waits behind it";
}

// Likewise a large prompt of a busy client that lighter clients' small requests overtake (it was
// a rule that a request first in line and too large for the cache holds the line): overtaken
// max_passed_over times, it comes first.
TEST(BatchScheduler, ALargeRequestOvertakenByOtherClientsGetsItsTurn) {
  KvBlockAllocator kv(8, 4);  // 32 tokens
  ASSERT_TRUE(kv.Reserve(1, 8).ok());
  SchedulerLimits limits;
  limits.max_passed_over = 2;
  const ScheduledSequence running = From("a", 1, 8);
  ScheduledSequence large = From("a", 2);
  large.prompt_tokens = 20;  // 6 blocks: does not fit beside the running one's
  const ScheduledSequence small = From("b", 3);
  auto plan = PlanStep({running}, {large, small}, kv, limits);
  EXPECT_EQ(plan.admitted, (std::vector<SequenceId>{3}));
  EXPECT_EQ(plan.passed_over, (std::vector<SequenceId>{2}));  // a later arrival went first
  large.passed_over = 2;
  plan = PlanStep({running}, {large, small}, kv, limits);
  EXPECT_TRUE(plan.admitted.empty()) << "first in line and too large: it holds the line";
}

// Steps of a burst (client a: 2 running, 40 waiting) beside a steady client (b: one request
// waiting at a time, a new one as each is admitted), one running request ending each step. b's
// requests wait at most a step or two throughout, and a's first waiting request still gets its
// turn after max_passed_over steps of being overtaken. (Counted against every waiting request of
// a's backlog, all of it came first after max_passed_over steps and b waited behind it again.)
TEST(BatchScheduler, ABurstBesideASteadyClientNeitherHoldsItBackNorStarves) {
  KvBlockAllocator kv(1000, 16);
  SchedulerLimits limits;
  limits.max_running = 2;
  limits.max_passed_over = 4;
  std::vector<ScheduledSequence> running = {From("a", 1, 4), From("a", 2, 4)};
  std::vector<ScheduledSequence> waiting;
  SequenceId next_id = 3;
  for (int i = 0; i < 40; ++i) waiting.push_back(From("a", next_id++));
  std::map<SequenceId, int> waited;  // b's requests: steps each waited
  int steps_without_a = 0, longest_without_a = 0;
  for (int step = 0; step < 30; ++step) {
    running.erase(running.begin());  // the oldest ends
    if (std::none_of(waiting.begin(), waiting.end(),
                     [](const ScheduledSequence& s) { return s.client == "b"; })) {
      waiting.push_back(From("b", next_id++));
    }
    const StepPlan plan = PlanStep(running, waiting, kv, limits);
    for (SequenceId id : plan.passed_over) {
      for (auto& s : waiting) s.passed_over += s.id == id ? 1 : 0;
    }
    bool a_admitted = false;
    for (SequenceId id : plan.admitted) {
      const auto it = std::find_if(waiting.begin(), waiting.end(),
                                   [id](const ScheduledSequence& s) { return s.id == id; });
      ASSERT_NE(it, waiting.end());
      a_admitted |= it->client == "a";
      ScheduledSequence admitted = *it;
      admitted.computed_tokens = admitted.prompt_tokens;
      running.push_back(admitted);
      waiting.erase(it);
    }
    for (const auto& s : waiting) {
      if (s.client == "b") ++waited[s.id];
    }
    steps_without_a = a_admitted ? 0 : steps_without_a + 1;
    longest_without_a = std::max(longest_without_a, steps_without_a);
  }
  for (const auto& [id, steps] : waited) EXPECT_LE(steps, 2) << "b's request " << id;
  EXPECT_LE(longest_without_a, limits.max_passed_over + 1);
}

}  // namespace
}  // namespace lorad::engine
