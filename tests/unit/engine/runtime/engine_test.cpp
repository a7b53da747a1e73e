// Engine (engine/runtime/engine.h) on the CPU with the tiny fixture model: a job's data is read
// and tokenized beside the GPU loop, which goes on serving, and a cancel or a shutdown during
// that read ends the job without training it. (The daemon's e2e tests cover the rest of the
// engine through gRPC; tests/gpu/engine_gpu_test.cpp runs the loop on a GPU.)
#include "engine/runtime/engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "engine/runtime/device_info.h"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;
using std::chrono::seconds;

// A fresh folder for one test.
fs::path FreshFolder(const std::string& name) {
  const fs::path folder = fs::path(::testing::TempDir()) / ("lorad-engine-test-" + name);
  fs::remove_all(folder);
  fs::create_directories(folder);
  return folder;
}

// A question/answer file of `records` records: large enough that reading and tokenizing it
// takes far longer than a few generated tokens.
std::string LargeDataset(const fs::path& folder, int records) {
  const fs::path path = folder / "large.jsonl";
  std::ofstream out(path);
  for (int i = 0; i < records; ++i) {
    out << "{\"question\": \"What is item number " << i
        << " of the long list of things?\", \"answer\": \"Item " << i
        << " is a thing on the list, the same as the others.\"}\n";
  }
  return path.string();
}

std::unique_ptr<Engine> StartTinyEngine() {
  EngineOptions options;
  options.model_folder = std::getenv("LORAD_TINY_MODEL");
  options.device = "cpu";
  auto engine = Engine::Start(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? *std::move(engine) : nullptr;
}

TrainingJobConfig JobOn(const std::string& data, const fs::path& output_dir) {
  TrainingJobConfig config;
  config.data.path = data;
  config.lora.r = 4;
  config.max_steps = 2;
  config.micro_batch_size = 1;
  config.grad_accum = 1;
  config.max_seq_length = 64;
  config.output_dir = output_dir.string();
  return config;
}

// The events of one job and of one generation request, from the loop thread.
struct Observed {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<TrainingEvent> job_events;
  std::optional<TokenEvent> finished;
  int32_t preparing_when_finished = -1;  // Stats().training_jobs_preparing as the request ended

  TrainingEventCallback JobCallback() {
    return [this](const TrainingEvent& e) {
      std::lock_guard<std::mutex> lock(mu);
      job_events.push_back(e);
      cv.notify_all();
    };
  }
  bool JobEnded() {
    return !job_events.empty() && (job_events.back().kind == TrainingEvent::Kind::kFinished ||
                                   job_events.back().kind == TrainingEvent::Kind::kFailed);
  }
};

// Training's share of the loop is earned by inference steps taken while a job trains: a job that
// starts after the engine has served alone for a while (or read its data beside the loop) must
// not run on credit saved up meanwhile. It did, up to 2 s of micro-batches in a row before the
// next token of any stream. Here: streams served back to back, then a job; between two tokens
// only a few micro-batches run (train_share 0.3: each costs far more than a decode step earns).
TEST(EngineTest, AJobStartingBesideStreamsDoesNotSpendCreditSavedBeforeIt) {
  auto engine = StartTinyEngine();
  ASSERT_NE(engine, nullptr);
  const fs::path folder = FreshFolder("saved-credit");
  std::mutex mu;
  std::condition_variable cv;
  std::string log;  // 'T' a token of a stream, 'S' a training step, in the loop's order
  bool request_done = false, stop_feeding = false;
  std::thread feeder([&] {
    while (true) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (stop_feeding) return;
        request_done = false;
      }
      GenerationRequest request;
      request.prompt = "Once upon a time";
      request.sampling.max_new_tokens = 900;
      request.ignore_eos = true;
      auto id = engine->Generate(request, [&](const TokenEvent& e) {
        std::lock_guard<std::mutex> lock(mu);
        if (e.token) log += 'T';
        if (e.finished) request_done = true;
        cv.notify_all();
      });
      ASSERT_TRUE(id.ok()) << id.status();
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return request_done; });
    }
  });
  struct StopFeeding {  // whatever fails below, the feeder ends and is joined
    std::mutex& mu;
    bool& stop;
    std::thread& feeder;
    ~StopFeeding() {
      {
        std::lock_guard<std::mutex> lock(mu);
        stop = true;
      }
      if (feeder.joinable()) feeder.join();
    }
  } stop_feeder{mu, stop_feeding, feeder};
  {  // serve alone long enough to have saved up many micro-batches' worth
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, seconds(120), [&] { return log.size() >= 2000; }));
  }
  TrainingJobConfig config =
      JobOn(std::string(LORAD_SOURCE_DIR) + "/tests/fixtures/qa_small.jsonl", folder / "job");
  config.max_steps = 12;
  bool job_ended = false;
  ASSERT_TRUE(engine
                  ->StartTraining("beside-streams", config,
                                  [&](const TrainingEvent& e) {
                                    std::lock_guard<std::mutex> lock(mu);
                                    if (e.kind == TrainingEvent::Kind::kStep) log += 'S';
                                    job_ended |= e.kind == TrainingEvent::Kind::kFinished ||
                                                 e.kind == TrainingEvent::Kind::kFailed;
                                    cv.notify_all();
                                  })
                  .ok());
  std::string seen;
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, seconds(300), [&] { return job_ended; }));
    stop_feeding = true;
    seen = log;
  }
  feeder.join();  // its last request ends first
  size_t longest = 0, run = 0;
  for (char c : seen) {
    run = c == 'S' ? run + 1 : 0;
    longest = std::max(longest, run);
  }
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 'S'), 12);
  // Credit is earned by measured time: a decode step the OS paused on a loaded machine earns a
  // few micro-batches at once (5 in a row seen with the 2 cores busy beside the test), while
  // saved-up credit ran all 12. 8 tells the two apart without failing on a busy machine.
  EXPECT_LE(longest, 8u) << "training steps in a row while streams waited: " << longest;
  engine.reset();  // before what its callbacks use
}

TEST(EngineTest, ServesWhileAJobReadsItsDataAndACancelThenEndsItUntrained) {
  auto engine = StartTinyEngine();
  ASSERT_NE(engine, nullptr);
  const fs::path folder = FreshFolder("serve-while-preparing");
  Observed seen;
  ASSERT_TRUE(engine
                  ->StartTraining("big", JobOn(LargeDataset(folder, 200000), folder / "job"),
                                  seen.JobCallback())
                  .ok());
  GenerationRequest request;
  request.prompt = "Hello";
  request.sampling.max_new_tokens = 4;
  request.ignore_eos = true;
  Engine* raw = engine.get();
  ASSERT_TRUE(raw->Generate(request,
                            [&](const TokenEvent& e) {
                              if (!e.finished) return;
                              const int32_t preparing = raw->Stats().training_jobs_preparing;
                              std::lock_guard<std::mutex> lock(seen.mu);
                              seen.finished = e;
                              seen.preparing_when_finished = preparing;
                              seen.cv.notify_all();
                            })
                  .ok());
  {
    std::unique_lock<std::mutex> lock(seen.mu);
    ASSERT_TRUE(seen.cv.wait_for(lock, seconds(120), [&] { return seen.finished.has_value(); }));
    EXPECT_EQ(seen.finished->finish_reason, FinishReason::kLength);
    // The request was served while the job's data was still being read (on the loop thread, the
    // read would have held it until the end).
    EXPECT_EQ(seen.preparing_when_finished, 1);
    EXPECT_TRUE(seen.job_events.empty());
  }
  engine->CancelTraining("big");
  std::unique_lock<std::mutex> lock(seen.mu);
  ASSERT_TRUE(seen.cv.wait_for(lock, seconds(120), [&] { return seen.JobEnded(); }));
  ASSERT_EQ(seen.job_events.size(), 1u) << "a job cancelled while reading its data trained";
  EXPECT_EQ(seen.job_events.back().kind, TrainingEvent::Kind::kFinished);
  EXPECT_TRUE(seen.job_events.back().summary.cancelled);
  EXPECT_EQ(seen.job_events.back().summary.steps, 0);
  EXPECT_FALSE(engine->TrainingActive());
}

TEST(EngineTest, StopTrainingDuringADataReadEndsTheJobUntrainedAndAnotherEngineTrainsIt) {
  const fs::path folder = FreshFolder("stop-while-preparing");
  const std::string data = LargeDataset(folder, 200000);
  {
    auto engine = StartTinyEngine();
    ASSERT_NE(engine, nullptr);
    Observed seen;
    ASSERT_TRUE(engine->StartTraining("big", JobOn(data, folder / "job"), seen.JobCallback()).ok());
    EXPECT_EQ(engine->StopTraining(), 1);
    std::lock_guard<std::mutex> lock(seen.mu);
    ASSERT_TRUE(seen.JobEnded()) << "StopTraining returned before the job ended";
    EXPECT_EQ(seen.job_events.size(), 1u);
    EXPECT_TRUE(seen.job_events.back().summary.cancelled);
    EXPECT_FALSE(fs::exists(folder / "job" / "adapter"));
  }
  // The next start trains it from the beginning (nothing was checkpointed).
  auto engine = StartTinyEngine();
  ASSERT_NE(engine, nullptr);
  Observed seen;
  ASSERT_TRUE(engine->StartTraining("big", JobOn(data, folder / "job"), seen.JobCallback()).ok());
  std::unique_lock<std::mutex> lock(seen.mu);
  ASSERT_TRUE(seen.cv.wait_for(lock, seconds(300), [&] { return seen.JobEnded(); }));
  ASSERT_EQ(seen.job_events.back().kind, TrainingEvent::Kind::kFinished)
      << seen.job_events.back().error;
  EXPECT_FALSE(seen.job_events.back().summary.cancelled);
  EXPECT_EQ(seen.job_events.back().summary.steps, 2);
  EXPECT_EQ(seen.job_events.front().kind, TrainingEvent::Kind::kStep);
  EXPECT_EQ(seen.job_events.front().step.step, 1);
}

TEST(EngineTest, AStoppedEngineRefusesTrainingJobs) {
  auto engine = StartTinyEngine();
  ASSERT_NE(engine, nullptr);
  const fs::path folder = FreshFolder("stopped-engine");
  engine->Stop();
  absl::Status started = engine->StartTraining(
      "late", JobOn(LargeDataset(folder, 10), folder / "job"), [](const TrainingEvent&) {});
  EXPECT_TRUE(absl::IsUnavailable(started)) << started;
  EXPECT_EQ(engine->Stats().training_jobs_preparing, 0);
}

// Stop ends the requests still streaming (their last event: cancelled, Unavailable) and refuses
// later ones: before, they were dropped with the loop and an embedder waiting on their end hung.
TEST(EngineTest, StopEndsTheRequestsStillStreamingAndRefusesNewOnes) {
  auto engine = StartTinyEngine();
  ASSERT_NE(engine, nullptr);
  Observed seen;
  std::vector<int32_t> tokens;
  GenerationRequest request;
  request.prompt_ids = {1, 5, 9, 13};
  request.sampling.max_new_tokens = 4000;
  request.ignore_eos = true;
  auto id = engine->Generate(request, [&](const TokenEvent& e) {
    std::lock_guard<std::mutex> lock(seen.mu);
    if (e.token) tokens.push_back(*e.token);
    if (e.finished) seen.finished = e;
    seen.cv.notify_all();
  });
  ASSERT_TRUE(id.ok()) << id.status();
  {
    std::unique_lock<std::mutex> lock(seen.mu);
    ASSERT_TRUE(seen.cv.wait_for(lock, seconds(60), [&] { return tokens.size() >= 2; }));
  }
  engine->Stop();
  std::lock_guard<std::mutex> lock(seen.mu);
  ASSERT_TRUE(seen.finished.has_value());
  EXPECT_EQ(seen.finished->finish_reason, FinishReason::kCancelled);
  EXPECT_TRUE(absl::IsUnavailable(seen.finished->status)) << seen.finished->status;
  auto late = engine->Generate(request, [](const TokenEvent&) {});
  EXPECT_TRUE(absl::IsUnavailable(late.status())) << late.status();
}

// The host's memory in all (what a job's pinned offload memory is checked against) is at least
// what is available now, and both agree with /proc/meminfo's own lines within a cgroup's limit.
TEST(EngineTest, HostMemoryInAllIsAtLeastWhatIsAvailable) {
  const int64_t total = TotalHostBytes();
  const int64_t available = AvailableHostBytes();
  ASSERT_GT(total, 0) << "/proc/meminfo is not readable here";
  ASSERT_GT(available, 0);
  EXPECT_GE(total, available);
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit && key != "MemTotal:") {
  }
  ASSERT_EQ(key, "MemTotal:");
  EXPECT_LE(total, kib * 1024);  // a cgroup's limit may be lower, never higher
}

// A KV cache larger than the memory left is refused naming the setting, before it is allocated
// (the allocation failed with the allocator's own words on CUDA; on the CPU the out-of-memory
// killer ended the process once its pages were touched).
TEST(EngineTest, AKvCacheLargerThanTheMemoryLeftIsRefusedNamingTheSetting) {
  const int64_t available = AvailableHostBytes();
  ASSERT_GT(available, 0) << "/proc/meminfo is not readable here";
  EngineOptions options;
  options.model_folder = std::getenv("LORAD_TINY_MODEL");
  options.device = "cpu";
  options.inference.kv_cache_bytes = available + (int64_t{1} << 30);
  auto engine = Engine::Start(options);
  ASSERT_FALSE(engine.ok());
  // A setting to change: INVALID_ARGUMENT, which the daemon's start turns into exit code 2.
  EXPECT_TRUE(absl::IsInvalidArgument(engine.status())) << engine.status();
  EXPECT_NE(engine.status().message().find("engine.kv_cache_bytes"), std::string::npos)
      << engine.status();
  EXPECT_NE(engine.status().message().find("lower it"), std::string::npos) << engine.status();
}

}  // namespace
}  // namespace lorad::engine
