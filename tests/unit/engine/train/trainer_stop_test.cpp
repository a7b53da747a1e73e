// The trainer stopped, cancelled and resumed at awkward moments: a resume continues exactly (the
// loss curve, the evaluations, each job's random stream), and what was trained is never lost.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <thread>

#include "engine/train/checkpoint_folders.h"
#include "engine/train/trainer.h"
#include "engine/train/training_checkpoint.h"
#include "nlohmann/json.hpp"
#include "tests/unit/engine/train/trainer_test_fixture.h"

namespace lorad::engine {
namespace {

// What Engine::StopTrainers does to one trainer: its periodic evaluation skipped, the step under
// way finished, a checkpoint at the step boundary, then the job ends cancelled.
void StopLikeTheEngine(Trainer& t) {
  t.Interrupt();
  while (!t.done() && !t.cancelled() && !t.at_step_boundary() && t.Step().ok()) {
  }
  if (!t.done() && !t.cancelled() && t.at_step_boundary()) {
    ASSERT_TRUE(t.SaveCheckpoint().ok());
  }
  t.Cancel();
  while (!t.done() && t.Step().ok()) {
  }
}

// `config` run straight through, and run again stopped like the engine once step `stop_at` is
// trained (its cadence evaluation next), then resumed: each run's events.
struct StoppedBeforeEvaluation {
  std::vector<TrainingEvent> straight, first, second;
};
StoppedBeforeEvaluation RunStoppedBeforeEvaluation(const TrainerTest& test,
                                                   TrainingJobConfig config, int64_t stop_at,
                                                   const std::string& stopped_folder) {
  StoppedBeforeEvaluation runs;
  const auto create = [&](std::vector<TrainingEvent>* events) {
    auto t = Trainer::Create(test.model(), test.tokenizer(), test.model_dir(), config,
                             [events](const TrainingEvent& e) { events->push_back(e); });
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *std::move(t) : nullptr;
  };
  if (auto t = create(&runs.straight)) {
    EXPECT_TRUE(t->Run().ok());
  }
  config.output_dir = (test.out() / stopped_folder).string();
  if (auto t = create(&runs.first)) {
    while (t->step() < stop_at) {
      if (!t->Step().ok()) break;
    }
    StopLikeTheEngine(*t);
  }
  if (auto t = create(&runs.second)) {
    EXPECT_TRUE(t->Run().ok());
  }
  return runs;
}

// Every evaluation step of the stopped run's two parts.
std::vector<int64_t> JoinedEvalSteps(const StoppedBeforeEvaluation& runs) {
  std::vector<int64_t> evals = EvalSteps(runs.first);
  for (int64_t s : EvalSteps(runs.second)) evals.push_back(s);
  return evals;
}

TEST_F(TrainerTest, ResumedRunRepeatsTheUninterruptedLossCurve) {
  TrainingJobConfig config = Config("straight");
  config.lora.dropout = 0.1;  // the RNG state must be restored too
  config.save_every = 10;
  std::vector<TrainingEvent> straight;
  auto a = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { straight.push_back(e); });
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE((*a)->Run().ok());

  config.output_dir = (out_ / "resumed").string();
  std::vector<TrainingEvent> first, second;
  {
    auto b = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                             [&](const TrainingEvent& e) { first.push_back(e); });
    ASSERT_TRUE(b.ok());
    while ((*b)->step() < 10) ASSERT_TRUE((*b)->Step().ok());
    // Stopped here: as if the daemon was killed after the step-10 checkpoint.
  }
  EXPECT_TRUE(fs::exists(fs::path(config.output_dir) / "checkpoint-10" / "adapter" /
                         "adapter_model.safetensors"));
  auto c = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { second.push_back(e); });
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE((*c)->resumed());
  EXPECT_EQ((*c)->step(), 10);
  ASSERT_TRUE((*c)->Run().ok());
  // The checkpoint's steps, then the checkpoint it resumed from, are reported first, as the
  // first run reported them (it may have died before its history was recorded), marked replayed.
  std::vector<StepMetrics> reported;
  for (const TrainingEvent& e : first) {
    if (e.kind == TrainingEvent::Kind::kStep) reported.push_back(e.step);
  }
  ASSERT_EQ(reported.size(), 10u);
  ASSERT_GT(second.size(), 11u);
  for (size_t i = 0; i < 10; ++i) {
    const TrainingEvent& e = second[i];
    ASSERT_EQ(e.kind, TrainingEvent::Kind::kStep) << i;
    EXPECT_TRUE(e.replayed);
    EXPECT_EQ(e.step.step, reported[i].step);
    EXPECT_EQ(e.step.loss, reported[i].loss);
    EXPECT_EQ(e.step.learning_rate, reported[i].learning_rate);
    EXPECT_EQ(e.step.grad_norm, reported[i].grad_norm);
    EXPECT_EQ(e.step.tokens, reported[i].tokens);
    EXPECT_EQ(e.step.elapsed_s, reported[i].elapsed_s);
  }
  EXPECT_EQ(second[10].kind, TrainingEvent::Kind::kCheckpoint);
  EXPECT_EQ(second[10].checkpoint.step, 10);
  EXPECT_TRUE(second[10].replayed);
  for (size_t i = 11; i < second.size(); ++i) EXPECT_FALSE(second[i].replayed) << i;

  std::vector<double> joined = Losses(first);
  for (double l : Losses(second)) joined.push_back(l);
  const std::vector<double> expected = Losses(straight);
  ASSERT_EQ(expected.size(), 20u);
  ASSERT_EQ(joined.size(), 20u);
  for (size_t i = 0; i < 20; ++i) EXPECT_EQ(joined[i], expected[i]) << "step " << i + 1;
  ASSERT_EQ(second.back().kind, TrainingEvent::Kind::kFinished);
  EXPECT_EQ(second.back().summary.steps, 20);
  // The mean loss covers both runs (the sum is kept in the checkpoint), as the straight run's.
  ASSERT_EQ(straight.back().kind, TrainingEvent::Kind::kFinished);
  EXPECT_EQ(second.back().summary.train_loss, straight.back().summary.train_loss);
  EXPECT_GT(second.back().summary.train_loss, 0);
}

// A damaged newest checkpoint (a file emptied: a failing disk, an operator's mistake) is passed
// over for the one before it, with a warning: the job resumes and ends as an uninterrupted run
// does. With every checkpoint damaged, the job's start says what to do.
TEST_F(TrainerTest, AResumePassesOverADamagedCheckpointForTheOneBefore) {
  TrainingJobConfig config = Config("straight");
  config.max_steps = 8;
  config.save_every = 2;
  std::vector<TrainingEvent> straight;
  auto a = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { straight.push_back(e); });
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE((*a)->Run().ok());

  config.output_dir = (out_ / "damaged").string();
  std::vector<TrainingEvent> first, second;
  {
    auto b = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                             [&](const TrainingEvent& e) { first.push_back(e); });
    ASSERT_TRUE(b.ok());
    while ((*b)->step() < 5) ASSERT_TRUE((*b)->Step().ok());  // killed: checkpoints 2 and 4
  }
  const fs::path damaged = fs::path(config.output_dir) / "checkpoint-4" / "trainer_state.json";
  ASSERT_TRUE(fs::exists(damaged));
  std::ofstream(damaged, std::ios::trunc).flush();
  auto c = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { second.push_back(e); });
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->step(), 2);
  ASSERT_TRUE((*c)->Run().ok());
  ASSERT_GE(second.size(), 2u);
  EXPECT_EQ(second[0].kind, TrainingEvent::Kind::kWarning);
  EXPECT_NE(second[0].error.find("checkpoint-4 cannot be resumed from"), std::string::npos)
      << second[0].error;
  // Steps 1 and 2 reported again (replayed), then the checkpoint resumed from.
  ASSERT_GE(second.size(), 4u);
  EXPECT_TRUE(second[1].replayed && second[2].replayed);
  EXPECT_EQ(second[2].step.step, 2);
  EXPECT_EQ(second[3].kind, TrainingEvent::Kind::kCheckpoint);
  EXPECT_EQ(second[3].checkpoint.step, 2);
  std::vector<double> joined = Losses(first);
  joined.resize(2);  // steps 3 to 5 are trained again
  for (double l : Losses(second)) joined.push_back(l);
  EXPECT_EQ(joined, Losses(straight));
  ASSERT_EQ(second.back().kind, TrainingEvent::Kind::kFinished);
  EXPECT_FALSE(second.back().summary.cancelled);

  // A newest folder a file is missing from is passed over too, and said so.
  {
    auto e = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
    ASSERT_TRUE(e.ok()) << e.status();
  }
  std::vector<int64_t> complete;
  for (const auto& [step, folder] : CompleteCheckpoints(config.output_dir)) {
    complete.push_back(step);
  }
  ASSERT_FALSE(complete.empty());
  const int64_t newest = *std::max_element(complete.begin(), complete.end());
  fs::remove(fs::path(CheckpointPath(config.output_dir, newest)) / "rng.pt");
  std::vector<TrainingEvent> third;
  auto f = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { third.push_back(e); });
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_LT((*f)->step(), newest);
  ASSERT_TRUE((*f)->Step().ok());
  ASSERT_FALSE(third.empty());
  EXPECT_EQ(third[0].kind, TrainingEvent::Kind::kWarning);
  EXPECT_NE(third[0].error.find("lacks rng.pt; it is passed over"), std::string::npos)
      << third[0].error;

  // Every checkpoint damaged: refused, saying what to do.
  for (const auto& f : fs::directory_iterator(config.output_dir)) {
    if (f.path().filename().string().rfind("checkpoint-", 0) == 0) {
      std::ofstream(f.path() / "trainer_state.json", std::ios::trunc).flush();
    }
  }
  auto d = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("move the checkpoint-* folders aside"), std::string::npos)
      << d.status();
}

// Jobs that take turns step by step (the GPU loop's way with several jobs) draw LoRA dropout from
// their own streams: each one's losses equal its run alone, also across a shutdown and resume.
TEST_F(TrainerTest, InterleavedJobsKeepTheirOwnDropoutStreams) {
  TrainingJobConfig a = Config("alone");
  a.lora.dropout = 0.1;
  a.max_steps = 4;
  std::vector<TrainingEvent> alone, a_events, b_events;
  auto solo = Trainer::Create(*model_, *tokenizer_, model_dir_, a,
                              [&](const TrainingEvent& e) { alone.push_back(e); });
  ASSERT_TRUE(solo.ok()) << solo.status();
  ASSERT_TRUE((*solo)->Run().ok());

  a.output_dir = (out_ / "together-a").string();
  TrainingJobConfig b = Config("together-b");
  b.lora.dropout = 0.2;
  b.seed = 5;
  b.max_steps = 4;
  auto first = Trainer::Create(*model_, *tokenizer_, model_dir_, a,
                               [&](const TrainingEvent& e) { a_events.push_back(e); });
  auto second = Trainer::Create(*model_, *tokenizer_, model_dir_, b,
                                [&](const TrainingEvent& e) { b_events.push_back(e); });
  ASSERT_TRUE(first.ok() && second.ok());
  while (!(*first)->done() || !(*second)->done()) {
    if (!(*first)->done()) {
      ASSERT_TRUE((*first)->Step().ok());
    }
    if (!(*second)->done()) {
      ASSERT_TRUE((*second)->Step().ok());
    }
  }
  EXPECT_EQ(Losses(a_events), Losses(alone));
  EXPECT_EQ(Losses(a_events).size(), 4u);

  // Stopped for a shutdown after step 2 and resumed: a job checkpointed between its steps saves
  // its own stream (the default generators hold the other job's), and resumes to the same losses.
  a.output_dir = (out_ / "stopped-a").string();
  b.output_dir = (out_ / "stopped-b").string();
  std::vector<TrainingEvent> before, after;
  {
    auto ja = Trainer::Create(*model_, *tokenizer_, model_dir_, a,
                              [&](const TrainingEvent& e) { before.push_back(e); });
    auto jb = Trainer::Create(*model_, *tokenizer_, model_dir_, b, nullptr);
    ASSERT_TRUE(ja.ok() && jb.ok());
    while ((*ja)->step() < 2) {
      ASSERT_TRUE((*ja)->Step().ok());
      ASSERT_TRUE((*jb)->Step().ok());
    }
    StopLikeTheEngine(**ja);  // A is at a step boundary: checkpointed without a Step()
    StopLikeTheEngine(**jb);
  }
  auto resumed = Trainer::Create(*model_, *tokenizer_, model_dir_, a,
                                 [&](const TrainingEvent& e) { after.push_back(e); });
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  ASSERT_EQ((*resumed)->step(), 2);
  ASSERT_TRUE((*resumed)->Run().ok());
  std::vector<double> joined = Losses(before);
  for (double l : Losses(after)) joined.push_back(l);
  EXPECT_EQ(joined, Losses(alone));
}

// A shutdown during the merged export (minutes for a large model, past a container's stop
// timeout) does not wait for it, nor does a user's cancel (the server publishes nothing of a
// cancelled job), which does not hold the loop either: the export gives up, writing nothing, and
// the job ends unfinished (its last step's checkpoint is there: after a shutdown, the next start
// redoes its end).
TEST_F(TrainerTest, ACancelOrShutdownDuringTheMergedExportAbandonsIt) {
  for (const bool shutdown : {false, true}) {
    SCOPED_TRACE(shutdown ? "shutdown" : "user's cancel");
    const std::string name = shutdown ? "shutdown-export" : "cancel-export";
    const fs::path slow = SlowExportModel(*this, "slow-model-" + name);
    std::vector<TrainingEvent> events;
    TrainingJobConfig config = Config(name);
    auto t = TrainUntilItsFilesAreWritten(*this, slow, &config, &events);
    ASSERT_NE(t, nullptr);
    if (shutdown) t->Interrupt();  // StopTraining's order: interrupt, then cancel
    t->Cancel();
    if (!shutdown) {
      // The export is held on its index (the FIFO) until it is written: a user's cancel does
      // not wait for it, the engine's loop goes on serving.
      ASSERT_TRUE(t->Step().ok());
      EXPECT_FALSE(t->done());
    }
    // Once the index is written the export sees it must stop.
    std::thread index_writer([&] { WriteWeightIndex(model_dir_, slow); });
    ASSERT_TRUE(t->Step().ok());
    for (int turn = 0; !shutdown && !t->done() && turn < 60000; ++turn) {
      ASSERT_TRUE(t->Step().ok());
    }
    index_writer.join();
    EXPECT_TRUE(t->done());
    ASSERT_EQ(events.back().kind, TrainingEvent::Kind::kFinished);
    EXPECT_TRUE(events.back().summary.cancelled);
    EXPECT_FALSE(fs::exists(fs::path(config.output_dir) / "merged"));
    EXPECT_FALSE(fs::exists(fs::path(config.output_dir) / "merged.tmp"));
    EXPECT_TRUE(fs::exists(fs::path(config.output_dir) / "checkpoint-2" / "trainer_state.json"));
  }
}

// A shutdown's checkpoint during a job's end (after the best evaluation's weights replaced the
// last step's, with load_best_at_end) keeps the end's checkpoint of the last step, and the resumed
// job publishes the best evaluation's adapter.
TEST_F(TrainerTest, ACheckpointDuringTheEndKeepsTheLastStepsWeights) {
  TrainingJobConfig config = Config("checkpoint-during-end");
  config.data.validation_fraction = 0.25;
  config.eval_every = 2;
  config.learning_rate = 0.7;  // step 3 evaluates worse than step 2: the best is step 2's
  config.max_steps = 3;
  config.load_best_at_end = true;
  std::vector<TrainingEvent> first, second;
  // The evaluation's loss where the run computed it (replayed: reported again from a checkpoint).
  auto eval_of = [](const std::vector<TrainingEvent>& events, int64_t step, bool replayed = false) {
    for (const auto& e : events) {
      if (e.kind == TrainingEvent::Kind::kEval && e.eval.step == step && e.replayed == replayed) {
        return e.eval.loss;
      }
    }
    return -1.0;
  };
  const std::string last =
      CheckpointPath(config.output_dir, 3) + "/adapter/adapter_model.safetensors";
  std::string written;
  {
    auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                             [&](const TrainingEvent& e) { first.push_back(e); });
    ASSERT_TRUE(t.ok()) << t.status();
    while (!fs::exists(last) || (*t)->idle_until()) ASSERT_TRUE((*t)->Step().ok());
    ASSERT_GT(eval_of(first, 3), eval_of(first, 2)) << "the test needs step 2 to be the best";
    written = ReadFile(last);
    ASSERT_TRUE((*t)->Step().ok());  // the best weights loaded, a first validation micro-batch
    ASSERT_FALSE((*t)->done());
    // Engine::StopTrainers:
    ASSERT_TRUE((*t)->at_step_boundary());
    ASSERT_TRUE((*t)->SaveCheckpoint().ok());
    (*t)->Cancel();
    ASSERT_TRUE((*t)->Step().ok());
    ASSERT_TRUE((*t)->done());
  }
  EXPECT_EQ(ReadFile(last), written) << "checkpoint-3 no longer holds step 3's weights";
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { second.push_back(e); });
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->Run().ok());
  // Step 3's evaluation was reported before its checkpoint was written: not run again, only
  // reported again from the checkpoint.
  EXPECT_EQ(eval_of(second, 3), -1.0);
  EXPECT_EQ(eval_of(second, 3, /*replayed=*/true), eval_of(first, 3));
  EXPECT_DOUBLE_EQ(second.back().summary.best_loss, eval_of(first, 2));
  EXPECT_FALSE(second.back().summary.cancelled);
  EXPECT_EQ(second.back().summary.adapter_step, 2);
}

TEST_F(TrainerTest, AJobStoppedAfterItsFinalCheckpointEndsWhenResumed) {
  // The end writes the last checkpoint, then the adapter: a process killed between the two
  // resumes at the last step and must only finish.
  TrainingJobConfig config = Config("final");
  config.max_steps = 4;
  {
    auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_TRUE((*t)->Run().ok());
  }
  fs::remove_all(fs::path(config.output_dir) / "adapter");
  std::vector<TrainingEvent> events;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { events.push_back(e); });
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE((*t)->resumed());
  const absl::Status finished = (*t)->Run();  // the finishing stages, a piece per Step()
  ASSERT_TRUE(finished.ok()) << finished;
  EXPECT_TRUE((*t)->done());
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().kind, TrainingEvent::Kind::kFinished);
  EXPECT_EQ(events.back().summary.steps, 4);
  for (const auto& e : events) {
    EXPECT_TRUE(e.kind != TrainingEvent::Kind::kStep || e.replayed) << "no step 5";
  }
  EXPECT_TRUE(fs::exists(fs::path(config.output_dir) / "adapter" / "adapter_model.safetensors"));
}

TEST_F(TrainerTest, CancelEndsTheJobWithoutAnAdapter) {
  TrainingJobConfig config = Config("cancel");
  std::vector<TrainingEvent> events;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { events.push_back(e); });
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->Step().ok());
  (*t)->Cancel();
  ASSERT_TRUE((*t)->Step().ok());
  EXPECT_TRUE((*t)->done());
  ASSERT_EQ(events.back().kind, TrainingEvent::Kind::kFinished);
  EXPECT_TRUE(events.back().summary.cancelled);
  EXPECT_FALSE((*t)->Step().ok());
}

// With load_best_at_end the best evaluation's adapter is written with the next checkpoint; a job
// cancelled before one still leaves it (the weights worth keeping of a job that went wrong).
TEST_F(TrainerTest, ACancelledJobLeavesItsBestEvaluationsAdapter) {
  TrainingJobConfig config = Config("cancel-best");
  config.data.validation_fraction = 0.25;
  config.eval_every = 1;
  config.load_best_at_end = true;
  std::vector<TrainingEvent> events;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { events.push_back(e); });
  ASSERT_TRUE(t.ok()) << t.status();
  const auto evaluated = [&] {
    return std::any_of(events.begin(), events.end(),
                       [](const TrainingEvent& e) { return e.kind == TrainingEvent::Kind::kEval; });
  };
  while (!evaluated()) ASSERT_TRUE((*t)->Step().ok());
  const fs::path best = fs::path(config.output_dir) / "best-adapter";
  EXPECT_FALSE(fs::exists(best)) << "written before a checkpoint asked for it";
  (*t)->Cancel();
  ASSERT_TRUE((*t)->Step().ok());
  ASSERT_TRUE((*t)->done());
  EXPECT_TRUE(events.back().summary.cancelled);
  auto written = LoraAdapter::ReadPeft(best.string());
  ASSERT_TRUE(written.ok()) << written.status();
}

// A shutdown during the last evaluation (the daemon's StopTrainers: Interrupt, SaveCheckpoint,
// Cancel, Step) writes the last step's checkpoint once: the cancel's found it written (it was
// written again, seconds more for a large model against a container's stop timeout).
TEST_F(TrainerTest, AShutdownDuringTheLastEvaluationWritesItsCheckpointOnce) {
  TrainingJobConfig config;
  std::vector<TrainingEvent> events;
  auto t = InItsLastEvaluation("shutdown-at-end", &config, &events);
  ASSERT_NE(t, nullptr);
  t->Interrupt();
  auto saved = t->SaveCheckpoint();
  ASSERT_TRUE(saved.ok()) << saved.status();
  t->Cancel();
  ASSERT_TRUE(t->Step().ok());
  EXPECT_TRUE(t->done());
  std::vector<std::string> written;
  for (const TrainingEvent& e : events) {
    if (e.kind == TrainingEvent::Kind::kCheckpoint) written.push_back(e.checkpoint.path);
  }
  EXPECT_EQ(written, std::vector<std::string>{*saved});
}

// A cancel once the last step is trained, during the evaluation that precedes its checkpoint,
// still writes that checkpoint: what was trained is kept (the cancelled job publishes nothing).
TEST_F(TrainerTest, ACancelDuringTheLastEvaluationKeepsTheLastStepsCheckpoint) {
  TrainingJobConfig config;
  std::vector<TrainingEvent> events;
  auto t = InItsLastEvaluation("cancel-at-end", &config, &events);
  ASSERT_NE(t, nullptr);
  const std::string checkpoint = CheckpointPath(config.output_dir, 2);
  ASSERT_FALSE(fs::exists(checkpoint)) << "the evaluation of 4 rows cannot have ended";
  t->Cancel();
  ASSERT_TRUE(t->Step().ok());
  EXPECT_TRUE(t->done());
  ASSERT_EQ(events.back().kind, TrainingEvent::Kind::kFinished);
  EXPECT_TRUE(events.back().summary.cancelled);
  EXPECT_TRUE(events.back().summary.adapter_path.empty()) << "nothing is published";
  ASSERT_GE(events.size(), 2u);
  ASSERT_EQ(events[events.size() - 2].kind, TrainingEvent::Kind::kCheckpoint);
  EXPECT_EQ(events[events.size() - 2].checkpoint.path, checkpoint);
  auto saved = LoraAdapter::ReadPeft(checkpoint + "/adapter");
  ASSERT_TRUE(saved.ok()) << saved.status();
  // The checkpoint holds the trained weights: a resume from it has nothing left to train.
  auto resumed = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_TRUE((*resumed)->resumed());
  EXPECT_EQ((*resumed)->step(), 2);
}

// A shutdown while the last step's cadence evaluation is pending: the resumed job evaluates that
// step and reports it (it was evaluated but never reported: missing from the history, from the
// best validation loss and from load_best_at_end's choice).
TEST_F(TrainerTest, AShutdownBeforeTheLastStepsCadenceEvaluationReportsItOnResume) {
  TrainingJobConfig config = Config("straight");
  config.data.validation_fraction = 0.25;
  config.eval_every = 2;
  config.max_steps = 4;
  const StoppedBeforeEvaluation runs = RunStoppedBeforeEvaluation(*this, config, 4, "stopped");
  EXPECT_EQ(EvalSteps(runs.straight), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(JoinedEvalSteps(runs), (std::vector<int64_t>{2, 4}));
  EXPECT_DOUBLE_EQ(runs.second.back().summary.best_loss, runs.straight.back().summary.best_loss);
  config.output_dir = (out_ / "stopped").string();
  // ... and a job resumed from its final checkpoint (written after the last evaluation) does not
  // report that evaluation again.
  std::vector<TrainingEvent> again;
  fs::remove_all(fs::path(config.output_dir) / "adapter");
  auto resumed = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                                 [&](const TrainingEvent& e) { again.push_back(e); });
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  ASSERT_TRUE((*resumed)->Run().ok());
  EXPECT_TRUE(EvalSteps(again).empty());
  EXPECT_DOUBLE_EQ(again.back().summary.best_loss, runs.straight.back().summary.best_loss);
}

// A shutdown before a cadence evaluation in the middle of a job: the resumed job runs it first, so
// the history, the best validation loss and early stopping have every evaluation the
// uninterrupted run had.
TEST_F(TrainerTest, AShutdownBeforeACadenceEvaluationRunsItOnResume) {
  TrainingJobConfig config = Config("straight-mid");
  config.data.validation_fraction = 0.25;
  config.eval_every = 2;
  config.max_steps = 6;
  const StoppedBeforeEvaluation runs = RunStoppedBeforeEvaluation(*this, config, 4, "stopped-mid");
  EXPECT_EQ(EvalSteps(runs.straight), (std::vector<int64_t>{2, 4, 6}));
  EXPECT_EQ(JoinedEvalSteps(runs), (std::vector<int64_t>{2, 4, 6}));
  EXPECT_DOUBLE_EQ(runs.second.back().summary.best_loss, runs.straight.back().summary.best_loss);
}

// A cancel during the last step's cadence evaluation writes that step's checkpoint first, as one
// during the end's own evaluation does.
TEST_F(TrainerTest, ACancelDuringTheLastStepsCadenceEvaluationKeepsItsCheckpoint) {
  TrainingJobConfig config = Config("cancel-at-end");
  config.data.validation_fraction = 0.25;
  config.micro_batch_size = 1;
  config.grad_accum = 1;
  config.max_steps = 2;
  config.eval_every = 2;
  config.save_every = 0;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
  ASSERT_TRUE(t.ok()) << t.status();
  while ((*t)->step() < 2) ASSERT_TRUE((*t)->Step().ok());
  ASSERT_TRUE((*t)->Step().ok());  // the evaluation's first validation row
  ASSERT_FALSE(fs::exists(CheckpointPath(config.output_dir, 2)));
  (*t)->Cancel();
  ASSERT_TRUE((*t)->Step().ok());
  ASSERT_TRUE((*t)->done());
  EXPECT_TRUE(fs::exists(CheckpointPath(config.output_dir, 2)));
}

// A job that trained on a GPU keeps the CUDA generator's state too (its dropout masks are drawn
// there), so a resume there repeats them; one that trained on the CPU has none.
TEST_F(TrainerTest, ACheckpointKeepsTheCudaGeneratorsStateWhenTheJobHasOne) {
  const fs::path out = out_ / "rng";
  LoraConfig lora;
  lora.r = 2;
  lora.target_modules = {"q_proj"};
  auto adapter = LoraAdapter::Init(model_->config(), lora, 1);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  RandomState rng = RandomState::Capture(/*with_cuda=*/false);
  TrainerState state;
  state.step = 1;
  auto cpu_only = WriteCheckpoint(out.string(), *adapter, {}, rng, state);
  ASSERT_TRUE(cpu_only.ok()) << cpu_only.status();
  auto read = ReadCheckpoint(*cpu_only);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(torch::equal(read->rng.cpu, rng.cpu));
  EXPECT_FALSE(read->rng.cuda.defined());
  rng.cuda = torch::arange(16, torch::kUInt8);  // the shape of a CUDA generator's state
  state.step = 2;
  auto with_cuda = WriteCheckpoint(out.string(), *adapter, {}, rng, state);
  ASSERT_TRUE(with_cuda.ok()) << with_cuda.status();
  read = ReadCheckpoint(*with_cuda);
  ASSERT_TRUE(read.ok()) << read.status();
  ASSERT_TRUE(read->rng.cuda.defined());
  EXPECT_TRUE(torch::equal(read->rng.cuda, rng.cuda));
}

// What a job starts from is read with its data, off the GPU loop (Create runs on the loop, and a
// large model's checkpoint is hundreds of MB): the checkpoint it resumes from, moved away between
// the two here, was read already.
TEST_F(TrainerTest, TheCheckpointAJobResumesFromIsReadWithItsData) {
  TrainingJobConfig config = Config("read-with-data");
  config.save_every = 2;
  config.max_steps = 4;
  {
    auto first = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
    ASSERT_TRUE(first.ok()) << first.status();
    while ((*first)->step() < 2) ASSERT_TRUE((*first)->Step().ok());
  }
  auto prepared = Trainer::PrepareData(*model_, *tokenizer_, model_dir_, config);
  ASSERT_TRUE(prepared.ok()) << prepared.status();
  fs::rename(CheckpointPath(config.output_dir, 2), out_ / "checkpoint-moved-away");
  auto resumed = Trainer::Create(*model_, *tokenizer_, model_dir_, *prepared, nullptr);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_TRUE((*resumed)->resumed());
  EXPECT_EQ((*resumed)->step(), 2);
}

}  // namespace
}  // namespace lorad::engine
