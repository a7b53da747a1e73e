// InferenceEngine on the tiny fixture (CPU fp32): how requests end: stop strings and tokens,
// cancels and deadlines, a request whose logits are NaN, Shutdown, and bad input, each while the
// engine keeps serving the others.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <thread>

#include "engine/infer/inference_engine.h"
#include "engine/lora/adapter_store.h"
#include "engine/lora/lora_adapter.h"
#include "engine/model/incremental_detokenizer.h"
#include "engine/model/llama_model.h"
#include "engine/model/tokenizer.h"
#include "engine/model/utf8.h"
#include "tests/unit/engine/infer/inference_engine_fixture.h"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;
using test_fixtures::Fixture;
using test_fixtures::Greedy;
using test_fixtures::RandomPrompt;
using test_fixtures::Result;

// The text a request streams for `tokens` (continuing its prompt), ended after them.
std::string StreamedText(const Tokenizer& tokenizer, const std::vector<int32_t>& tokens) {
  IncrementalDetokenizer detokenizer(tokenizer, /*skip_special_tokens=*/true,
                                     /*continues_text=*/true);
  std::string text;
  for (int32_t id : tokens) text += detokenizer.Add(id);
  return text + detokenizer.Finish();
}

TEST(InferenceEngineTest, StopStringsAndStopTokensEndGeneration) {
  Fixture f;
  GenerationRequest r = Greedy({}, "", 24);
  r.prompt = "Once upon a time";
  const Result full = f.Alone(r);
  ASSERT_GE(full.text.size(), 6u);
  // A stop string from the middle of the text: the output is the text before it.
  const size_t cut = full.text.size() / 2;
  GenerationRequest with_stop = r;
  with_stop.stop = {full.text.substr(cut, 3)};
  const Result stopped = f.Alone(with_stop);
  EXPECT_EQ(stopped.reason, FinishReason::kStop);
  EXPECT_EQ(stopped.text, full.text.substr(0, full.text.find(with_stop.stop[0])));
  EXPECT_LT(stopped.tokens.size(), full.tokens.size());
  // Generation ends at the token that completes a stop string, also when that token's text is
  // still held back (a run of byte pieces that more bytes could extend): for stops taken from
  // every part of the text, the tokens are the shortest prefix whose decoded text holds the stop.
  const auto& tok = f.tokenizer();
  for (size_t at = 0; at + 1 < full.text.size(); at += 2) {
    for (size_t length : {1, 2}) {
      GenerationRequest stop_here = r;
      stop_here.stop = {full.text.substr(at, length)};
      if (!IsValidUtf8(stop_here.stop[0])) continue;
      // (A byte run's text depends on where it ends: bytes that decode as text at the end of
      // a shorter sequence may turn into U+FFFD in the full one.)
      size_t shortest = 1;
      std::string decoded;
      for (; shortest <= full.tokens.size(); ++shortest) {
        // The prefix's text as the stream has it, as if it ended here.
        decoded = StreamedText(tok, {full.tokens.begin(), full.tokens.begin() + shortest});
        if (decoded.find(stop_here.stop[0]) != std::string::npos) break;
      }
      ASSERT_LE(shortest, full.tokens.size());
      const Result got = f.Alone(stop_here);
      EXPECT_EQ(got.reason, FinishReason::kStop) << "stop '" << stop_here.stop[0] << "'";
      EXPECT_EQ(got.tokens.size(), shortest) << "stop '" << stop_here.stop[0] << "'";
      EXPECT_EQ(got.text, decoded.substr(0, decoded.find(stop_here.stop[0])));
    }
  }
  // A stop token: generation ends on it (it counts as output).
  GenerationRequest with_token = r;
  with_token.stop_token_ids = {full.tokens[3]};
  const Result at_token = f.Alone(with_token);
  EXPECT_EQ(at_token.reason, FinishReason::kStop);
  const auto first = std::find(full.tokens.begin(), full.tokens.end(), full.tokens[3]);
  EXPECT_EQ(at_token.tokens, std::vector<int32_t>(full.tokens.begin(), first + 1));
  // ... but its text is not (vLLM's default): the text is that of the tokens before it.
  EXPECT_EQ(at_token.text, StreamedText(f.tokenizer(), {full.tokens.begin(), first}));
}

// A stop string holding U+FFFD (a client ending generation at the first undecodable output)
// ended it at the first byte of any character split across tokens: the text "if it ended here",
// which the check for stops complete in held-back bytes reads, turns that byte into U+FFFD. The
// stop now matches only a U+FFFD the text holds: the output is the full text up to it.
TEST(InferenceEngineTest, AReplacementCharacterStopMatchesOnlyOneTheTextHolds) {
  Fixture f;
  const std::string replacement(kReplacementChar);
  std::vector<GenerationRequest> plain, stopping;
  for (uint64_t seed = 1; seed <= 24; ++seed) {
    GenerationRequest r = Greedy({}, "", 40);
    r.prompt = "Once upon a time";
    r.sampling.temperature = 0.9f;
    r.sampling.repetition_penalty = 1.0f;
    r.sampling.seed = seed;
    plain.push_back(r);
    r.stop = {replacement};
    stopping.push_back(r);
  }
  auto engine = f.Engine();
  const std::vector<Result> full = f.Run(*engine, plain);
  const std::vector<Result> stopped = f.Run(*engine, stopping);
  const Tokenizer& tok = f.tokenizer();
  int split_characters_passed = 0;  // requests that went on past a character split across tokens
  for (size_t i = 0; i < full.size(); ++i) {
    EXPECT_EQ(stopped[i].text, full[i].text.substr(0, full[i].text.find(replacement)))
        << "seed " << i + 1;
    ASSERT_LE(stopped[i].tokens.size(), full[i].tokens.size());
    EXPECT_TRUE(
        std::equal(stopped[i].tokens.begin(), stopped[i].tokens.end(), full[i].tokens.begin()));
    for (size_t t = 0; t + 1 < stopped[i].tokens.size(); ++t) {
      const std::string bytes = tok.TokenBytes(stopped[i].tokens[t]);
      if (bytes.size() == 1 && static_cast<unsigned char>(bytes[0]) >= 0xC2 &&
          tok.Piece(stopped[i].tokens[t]).rfind("<0x", 0) == 0) {
        ++split_characters_passed;  // a lead byte's piece, and generation went on
        break;
      }
    }
  }
  EXPECT_GT(split_characters_passed, 0) << "no sample split a character: the test proves nothing";
}

// A stop token that is also an EOS id (a model whose generation_config lists a non-special token
// such as <|im_end|> among its EOS ids) had its text output, although a stop token's text is not
// (vLLM drops both). The finish reason stays EOS.
TEST(InferenceEngineTest, AStopTokenThatIsAlsoAnEosIdIsNotInTheText) {
  Fixture f;
  GenerationRequest r = Greedy({}, "", 24);
  r.prompt = "Once upon a time";
  const Result full = f.Alone(r);
  ASSERT_GE(full.tokens.size(), 6u);
  const int32_t end = full.tokens[3];
  ASSERT_FALSE(f.tokenizer().IsSpecial(end));
  // The fixture's tokenizer files, with `end` among generation_config.json's EOS ids.
  const fs::path folder = fs::path(::testing::TempDir()) / "stop-token-is-eos";
  fs::create_directories(folder);
  for (const char* name :
       {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "config.json"}) {
    fs::copy_file(fs::path(std::getenv("LORAD_TINY_MODEL")) / name, folder / name,
                  fs::copy_options::overwrite_existing);
  }
  std::ofstream(folder / "generation_config.json")
      << "{\"bos_token_id\": 1, \"eos_token_id\": [2, " << end << "]}";
  auto tokenizer = LoadTokenizer(folder.string());
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  ASSERT_TRUE((*tokenizer)->IsEos(end));
  GenerationRequest until = r;
  until.ignore_eos = false;
  until.stop_token_ids = {end};
  auto engine = f.Engine(Fixture::Small(), tokenizer->get());
  const Result got = f.Run(*engine, {until})[0];
  EXPECT_EQ(got.reason, FinishReason::kEos);
  const auto first = std::find(full.tokens.begin(), full.tokens.end(), end);
  EXPECT_EQ(got.tokens, std::vector<int32_t>(full.tokens.begin(), first + 1));
  EXPECT_EQ(got.text, StreamedText(f.tokenizer(), {full.tokens.begin(), first}));
}

TEST(InferenceEngineTest, CancelAndDeadlineFinishCleanlyWhileOthersContinue) {
  Fixture f;
  auto engine = f.Engine();
  Result cancelled, expired, other;
  auto a = engine->Submit(Greedy(RandomPrompt(5, 1), "", 100), Fixture::Collector(&cancelled));
  GenerationRequest late = Greedy(RandomPrompt(5, 2), "", 100);
  late.deadline = std::chrono::steady_clock::now() - std::chrono::seconds(1);
  ASSERT_TRUE(engine->Submit(late, Fixture::Collector(&expired)).ok());
  ASSERT_TRUE(engine->Submit(Greedy(RandomPrompt(5, 3), "", 10), Fixture::Collector(&other)).ok());
  ASSERT_TRUE(a.ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(engine->Step().ok());
  engine->Cancel(*a);
  engine->Cancel(12345);  // unknown: ignored
  Fixture::StepAll(*engine);
  EXPECT_EQ(cancelled.reason, FinishReason::kCancelled);
  EXPECT_EQ(cancelled.status.code(), absl::StatusCode::kCancelled);
  EXPECT_GE(cancelled.tokens.size(), 2u);
  EXPECT_LT(cancelled.tokens.size(), 100u);
  EXPECT_EQ(expired.reason, FinishReason::kCancelled);
  EXPECT_EQ(expired.status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(other.reason, FinishReason::kLength);
  EXPECT_EQ(other.tokens.size(), 10u);
  EXPECT_EQ(engine->Stats().running, 0);
}

// A request whose logits are NaN (here an adapter whose weights are NaN, published directly: a
// file with them is refused when read) ends with an error, and the base-model request beside it
// gets the tokens it gets alone.
TEST(InferenceEngineTest, ARequestWithNanLogitsFailsAndTheOthersGoOn) {
  Fixture f;
  LoraConfig config;
  config.r = 2;
  config.alpha = 4;
  auto adapter = LoraAdapter::Init(f.model().config(), config, 5);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  for (auto& [path, pair] : adapter->layers) {
    pair.b.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  ASSERT_TRUE(f.store().Publish("broken", *adapter, "test").ok());
  GenerationRequest broken = Greedy(RandomPrompt(6, 1), "broken", 10);
  broken.sampling.temperature = 1.0f;
  broken.sampling.top_p = 0.9f;
  broken.sampling.logprobs = 2;  // the batch's log-probabilities are gathered with the NaN row's
  GenerationRequest base = Greedy(RandomPrompt(6, 2), "", 10);
  base.sampling.logprobs = 1;
  auto engine = f.Engine();
  const std::vector<Result> results = f.Run(*engine, {broken, base});
  EXPECT_EQ(results[0].reason, FinishReason::kError);
  EXPECT_EQ(results[0].finished_events, 1);
  EXPECT_TRUE(results[0].tokens.empty());
  EXPECT_NE(results[0].status.message().find("not numbers (NaN)"), std::string::npos)
      << results[0].status;
  const Result alone = f.Alone(base);
  EXPECT_EQ(results[1].reason, FinishReason::kLength);
  EXPECT_EQ(results[1].tokens, alone.tokens);
}

// Shutdown (Engine::Stop, as its loop ends): a running request, a waiting one and one submitted
// after the last step each get exactly one last event, cancelled with the reason; later Submits
// are refused, and the engine holds no work. (Before, they were dropped with the engine: an
// embedder waiting on their end waited for ever.)
TEST(InferenceEngineTest, ShutdownEndsEveryRequestAndRefusesNewOnes) {
  Fixture f;
  InferenceEngineOptions options = Fixture::Small();
  options.scheduler.max_running = 1;  // the second request waits
  auto engine = f.Engine(options);
  Result running, waiting, late;
  ASSERT_TRUE(
      engine->Submit(Greedy(RandomPrompt(5, 1), "", 100), Fixture::Collector(&running)).ok());
  ASSERT_TRUE(
      engine->Submit(Greedy(RandomPrompt(5, 2), "", 100), Fixture::Collector(&waiting)).ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(engine->Step().ok());
  ASSERT_TRUE(engine->Submit(Greedy(RandomPrompt(5, 3), "", 100), Fixture::Collector(&late)).ok());
  EXPECT_EQ(engine->Stats().running, 1);
  engine->Shutdown("the test stopped it");
  for (const Result* r : {&running, &waiting, &late}) {
    EXPECT_EQ(r->finished_events, 1);
    EXPECT_EQ(r->reason, FinishReason::kCancelled);
    EXPECT_EQ(r->status.code(), absl::StatusCode::kUnavailable) << r->status;
    EXPECT_NE(r->status.message().find("the test stopped it"), std::string::npos) << r->status;
  }
  EXPECT_GE(running.tokens.size(), 1u);
  EXPECT_TRUE(waiting.tokens.empty());
  EXPECT_FALSE(engine->HasWork());
  EXPECT_EQ(engine->Stats().running, 0);
  EXPECT_EQ(engine->Stats().waiting, 0);
  Result refused;
  auto again = engine->Submit(Greedy(RandomPrompt(5, 4), "", 10), Fixture::Collector(&refused));
  EXPECT_TRUE(absl::IsUnavailable(again.status())) << again.status();
  EXPECT_EQ(refused.events, 0);
  engine->Shutdown("twice");  // idempotent: nothing more is sent
  EXPECT_EQ(running.finished_events, 1);
}

// A request that never joined the batch (cancelled while it waited) queued its whole life: its
// queue time is that wait, not 0 (lorad_request_queue_time_seconds showed queueing as instant
// exactly when requests gave up waiting).
TEST(InferenceEngineTest, ARequestCancelledWhileWaitingReportsItsWaitAsQueueTime) {
  Fixture f;
  auto engine = f.Engine();
  Result waited;
  auto id = engine->Submit(Greedy(RandomPrompt(5, 1), "", 10), Fixture::Collector(&waited));
  ASSERT_TRUE(id.ok()) << id.status();
  const auto submitted = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // no step: it is never admitted
  engine->Cancel(*id);
  Fixture::StepAll(*engine);
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - submitted).count();
  EXPECT_EQ(waited.reason, FinishReason::kCancelled);
  EXPECT_TRUE(waited.tokens.empty());
  EXPECT_GE(waited.usage.queue_time_s, 0.05);
  EXPECT_LE(waited.usage.queue_time_s, elapsed + 1.0);  // its own wait, not another clock's
}

// An unloaded adapter's requests that have not started end at once, saying why, instead of
// starting on it after the unload answered (an operator pulling a bad adapter got minutes more
// of its output); the running one finishes on it, and another adapter's request is served.
TEST(InferenceEngineTest, AnUnloadEndsTheAdaptersRequestsThatHaveNotStarted) {
  Fixture f;
  f.Publish("pulled", 4, 31);
  f.Publish("kept", 4, 32);
  InferenceEngineOptions options = Fixture::Small();
  options.scheduler.max_running = 1;
  auto engine = f.Engine(options);
  std::vector<Result> pulled(3);
  Result kept;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(
        engine
            ->Submit(Greedy(RandomPrompt(5, 300 + i), "pulled", 12), Fixture::Collector(&pulled[i]))
            .ok());
  }
  ASSERT_TRUE(
      engine->Submit(Greedy(RandomPrompt(5, 9), "kept", 6), Fixture::Collector(&kept)).ok());
  ASSERT_TRUE(engine->Step().ok());  // the first runs, the others wait
  std::thread unloader([&] { EXPECT_TRUE(f.store().Unload("pulled").ok()); });
  for (int i = 0; i < 200 && f.store().Contains("pulled"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  Fixture::StepAll(*engine);
  unloader.join();
  EXPECT_EQ(pulled[0].tokens.size(), 12u);
  for (int i = 1; i < 3; ++i) {
    EXPECT_TRUE(pulled[i].tokens.empty()) << i;
    EXPECT_EQ(pulled[i].reason, FinishReason::kCancelled) << i;
    EXPECT_EQ(pulled[i].status.code(), absl::StatusCode::kFailedPrecondition) << i;
    EXPECT_EQ(pulled[i].status.message(),
              "adapter 'pulled' version 1 was unloaded before this request started; send it "
              "again to be served by the adapter's current version, if it has one");
  }
  EXPECT_EQ(kept.tokens.size(), 6u);
  const auto left = f.store().List();  // the unloaded version freed once its request ended
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left[0].name, "kept");
}

TEST(InferenceEngineTest, BadInputIsAClearErrorAndTheEngineKeepsServing) {
  Fixture f;
  auto engine = f.Engine();
  auto expect_error = [&](GenerationRequest r, absl::StatusCode code, const std::string& field) {
    auto id = engine->Submit(r, nullptr);
    ASSERT_FALSE(id.ok()) << field;
    EXPECT_EQ(id.status().code(), code) << id.status();
    EXPECT_NE(id.status().message().find(field), std::string::npos) << id.status();
  };
  const GenerationRequest good = Greedy(RandomPrompt(5, 1), "", 4);
  GenerationRequest r = good;
  r.adapter = "no-such-adapter";
  expect_error(r, absl::StatusCode::kNotFound, "no-such-adapter");
  r = good;
  r.prompt_ids.clear();
  expect_error(r, absl::StatusCode::kInvalidArgument, "prompt: encodes to no tokens");
  r = good;
  r.prompt_ids = RandomPrompt(f.model().config().max_position_embeddings, 2);
  expect_error(r, absl::StatusCode::kInvalidArgument, "context");
  r = good;
  r.prompt_ids[2] = 100000;
  expect_error(r, absl::StatusCode::kInvalidArgument,
               "prompt: token 2 of its encoding is id 100000");
  r.prompt_field = "messages";  // a chat's
  expect_error(r, absl::StatusCode::kInvalidArgument, "messages: token 2");
  r = good;
  r.stop_token_ids = {5, 100000};
  expect_error(r, absl::StatusCode::kInvalidArgument, "sampling.stop_token_ids[1] = 100000");
  r.added_stop_token_ids = 1;  // from a stop string that is a special token's text
  expect_error(r, absl::StatusCode::kInvalidArgument,
               "sampling.stop: a stop string is the special token id 100000");
  r = good;
  r.sampling.max_new_tokens = 0;
  expect_error(r, absl::StatusCode::kInvalidArgument, "max_new_tokens");
  r = good;
  r.sampling.temperature = std::nanf("");
  expect_error(r, absl::StatusCode::kInvalidArgument, "temperature");
  r.sampling.temperature = -1.0f;
  expect_error(r, absl::StatusCode::kInvalidArgument, "temperature");
  r = good;
  r.sampling.top_p = 0.0f;
  expect_error(r, absl::StatusCode::kInvalidArgument, "top_p");
  r.sampling.top_p = 1.5f;
  expect_error(r, absl::StatusCode::kInvalidArgument, "top_p");
  r = good;
  r.stop = {"ok", ""};
  expect_error(r, absl::StatusCode::kInvalidArgument, "stop[1]");
  // Stop conditions are checked on every token: their number and size are bounded.
  r.stop = std::vector<std::string>(kMaxStopStrings + 1, "x");
  expect_error(r, absl::StatusCode::kInvalidArgument, "sampling.stop: 65 strings; at most 64");
  r.stop = {std::string(kMaxStopStringBytes + 1, 'x')};
  expect_error(r, absl::StatusCode::kInvalidArgument, "sampling.stop[0]: 1025 bytes");
  r = good;
  r.stop_token_ids = std::vector<int32_t>(kMaxStopTokenIds + 1, 1);
  expect_error(r, absl::StatusCode::kInvalidArgument, "sampling.stop_token_ids: 1025 ids");
  EXPECT_FALSE(engine->HasWork());
  const Result res = f.Run(*engine, {good})[0];
  EXPECT_EQ(res.tokens.size(), 4u);
  EXPECT_EQ(res.reason, FinishReason::kLength);
}

}  // namespace
}  // namespace lorad::engine
