// InferenceEngine on the tiny fixture (CPU fp32): batch invariance across adapters, chunked
// prefill and preemption; seeded sampling; temperature 0 = greedy; hot swap of adapter versions
// and unload under load (stop rules, cancels, deadlines and bad input:
// inference_engine_ending_test.cpp). Token-for-token agreement with transformers.generate is
// tests/parity/generation_parity_test.cpp.
#include "engine/infer/inference_engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <thread>

#include "engine/lora/adapter_store.h"
#include "engine/lora/lora_adapter.h"
#include "engine/model/incremental_detokenizer.h"
#include "engine/model/llama_model.h"
#include "engine/model/tokenizer.h"
#include "engine/model/utf8.h"
#include "tests/unit/engine/infer/inference_engine_fixture.h"

namespace lorad::engine {
namespace {

using test_fixtures::Fixture;
using test_fixtures::Greedy;
using test_fixtures::RandomPrompt;
using test_fixtures::Result;

// Publishes adapters "small" (r=2) and "large" (r=8) and returns six greedy requests of 10 tokens
// on small, the base and large in turn, prompt i of first + step * i random tokens.
std::vector<GenerationRequest> SixOnTwoAdaptersAndTheBase(Fixture& f, int first, int step,
                                                          uint64_t seed) {
  f.Publish("small", 2, 1);
  f.Publish("large", 8, 2);
  const std::vector<std::string> adapters = {"small", "", "large"};
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 6; ++i) {
    requests.push_back(Greedy(RandomPrompt(first + step * i, seed + i), adapters[i % 3], 10));
  }
  return requests;
}

TEST(InferenceEngineTest, MixedAdaptersChunkedPrefillAndPreemptionGiveTheTokensOfEachAlone) {
  Fixture f;
  f.Publish("small", 2, 1);
  f.Publish("large", 8, 2);
  f.Publish("mid", 4, 3);
  const std::vector<std::string> adapters = {"small", "", "large", "mid"};
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 8; ++i) {
    requests.push_back(Greedy(RandomPrompt(3 + 3 * i, 100 + i), adapters[i % 4], 12));
  }
  std::vector<Result> alone;
  for (const auto& r : requests) alone.push_back(f.Alone(r));

  // A pool of 20 blocks of 4 tokens cannot hold the 8 sequences (up to 36 tokens each): the
  // scheduler must preempt and recompute. Prefill chunks of 8 split the longer prompts.
  InferenceEngineOptions tight;
  tight.kv_cache_blocks = 20;
  tight.block_size = 4;
  tight.scheduler.prefill_chunk = 8;
  tight.scheduler.token_budget = 40;
  auto engine = f.Engine(tight);
  const std::vector<Result> together = f.Run(*engine, requests);
  int preempted = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(together[i].tokens, alone[i].tokens) << "request " << i;
    EXPECT_EQ(together[i].tokens.size(), 12u);
    EXPECT_EQ(together[i].reason, FinishReason::kLength);
    EXPECT_EQ(together[i].finished_events, 1);
    preempted += together[i].usage.preemptions;
  }
  EXPECT_GT(preempted, 0) << "the tiny pool was meant to force a preemption";
  EXPECT_GT(engine->Stats().preemptions, 0);
  EXPECT_EQ(engine->Stats().kv_cache_usage, 0.0);  // every block came back
  // The adapters matter: the same prompt with another adapter gives other tokens.
  GenerationRequest other = requests[0];
  other.adapter = "large";
  EXPECT_NE(f.Alone(other).tokens, alone[0].tokens);
}

// Long prompts prefilled in small pieces into a pool that cannot hold them all: every admitted
// request holds the blocks of its whole prompt from the start, so prefills never wait on
// memory the decoders took meanwhile (they did, and with the pool full no sequence could move:
// the engine spun for ever). Every request still finishes with the tokens it gets alone.
TEST(InferenceEngineTest, ChunkedPrefillsIntoAFullPoolNeverStall) {
  Fixture f;
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 10; ++i) requests.push_back(Greedy(RandomPrompt(30, 300 + i), "", 24));
  std::vector<Result> alone;
  for (const auto& r : requests) alone.push_back(f.Alone(r));
  InferenceEngineOptions tight;
  tight.kv_cache_blocks = 30;  // 120 tokens: two of the 54-token sequences, with room to spare
  tight.block_size = 4;
  tight.scheduler.prefill_chunk = 4;
  tight.scheduler.token_budget = 64;
  auto engine = f.Engine(tight);
  const std::vector<Result> together = f.Run(*engine, requests);
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(together[i].tokens, alone[i].tokens) << "request " << i;
    EXPECT_EQ(together[i].reason, FinishReason::kLength) << "request " << i;
  }
  EXPECT_EQ(engine->Stats().kv_cache_usage, 0.0);
}

// Requests submitted while others decode: their prompts prefill in the same steps as the others'
// decode tokens (the decode rows through the decode runner, the prefill rows through the padded
// forward), and every request still gets the tokens it gets alone.
// A request whose prompt and max_new_tokens together exceed the KV pool (not the model's context)
// ends with kLength when it fills the pool: preempted there, it could never be admitted again,
// and every request queued behind it waited for ever. Those run after it.
TEST(InferenceEngineTest, ASequenceThatFillsThePoolEndsThereAndTheQueueGoesOn) {
  Fixture f;
  InferenceEngineOptions o;
  o.kv_cache_blocks = 4;  // 16 tokens in all; the fixture's context is far longer
  o.block_size = 4;
  auto engine = f.Engine(o);
  ASSERT_GT(f.model().config().max_position_embeddings, 16);
  std::vector<Result> results(3);
  ASSERT_TRUE(
      engine->Submit(Greedy(RandomPrompt(5, 71), "", 100), Fixture::Collector(&results[0])).ok());
  ASSERT_TRUE(
      engine->Submit(Greedy(RandomPrompt(3, 72), "", 2), Fixture::Collector(&results[1])).ok());
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(engine->Step().ok());
  ASSERT_TRUE(
      engine->Submit(Greedy(RandomPrompt(3, 73), "", 2), Fixture::Collector(&results[2])).ok());
  Fixture::StepAll(*engine);
  EXPECT_EQ(results[0].finished_events, 1);
  EXPECT_EQ(results[0].reason, FinishReason::kLength);
  EXPECT_EQ(results[0].tokens.size(), 16u - 5u) << "prompt and output fill the 16-token pool";
  for (int i = 1; i < 3; ++i) {
    EXPECT_EQ(results[i].finished_events, 1) << i;
    EXPECT_EQ(results[i].tokens.size(), 2u) << i;
  }
  // Its tokens are those it gives alone in a pool that never runs out, up to the cut.
  Result alone = f.Alone(Greedy(RandomPrompt(5, 71), "", 11));
  EXPECT_EQ(results[0].tokens, alone.tokens);
}

TEST(InferenceEngineTest, RequestsArrivingWhileOthersDecodeGetTheTokensOfEachAlone) {
  Fixture f;
  const std::vector<GenerationRequest> requests = SixOnTwoAdaptersAndTheBase(f, 5, 7, 500);
  std::vector<Result> alone;
  for (const auto& r : requests) alone.push_back(f.Alone(r));

  auto engine = f.Engine();
  std::vector<Result> together(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    if (i > 0 && i % 2 == 0) {
      // The requests before are decoding (each has tokens, none has finished) as these arrive.
      for (size_t j = 0; j < i; ++j) {
        EXPECT_GT(together[j].tokens.size(), 0u) << "request " << j;
        EXPECT_EQ(together[j].finished_events, 0) << "request " << j;
      }
    }
    auto id = engine->Submit(requests[i], Fixture::Collector(&together[i]));
    ASSERT_TRUE(id.ok()) << id.status();
    if (i % 2 == 1) {  // two steps between arrivals
      for (int step = 0; step < 2; ++step) ASSERT_TRUE(engine->Step().ok());
    }
  }
  Fixture::StepAll(*engine);
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(together[i].tokens, alone[i].tokens) << "request " << i;
    EXPECT_EQ(together[i].tokens.size(), 10u);
  }
}

// Prompts of very different lengths in one step: the short ones are not padded to the long one's
// width (they prefill in a forward of their own), and each still gets its tokens alone, with the
// decode runner and without it.
TEST(InferenceEngineTest, PromptsOfVeryDifferentLengthsTogetherGiveTheTokensOfEachAlone) {
  Fixture f;
  f.Publish("small", 2, 1);
  std::vector<GenerationRequest> requests;
  for (const int length : {600, 7, 330, 12, 590}) {
    requests.push_back(Greedy(RandomPrompt(length, 700 + length), length % 2 ? "small" : "", 6));
  }
  std::vector<Result> alone;
  for (const auto& r : requests) alone.push_back(f.Alone(r));
  for (const bool paged_decode : {true, false}) {
    InferenceEngineOptions options = Fixture::Small();
    options.paged_decode = paged_decode;
    auto engine = f.Engine(options);
    const std::vector<Result> together = f.Run(*engine, requests);
    for (size_t i = 0; i < requests.size(); ++i) {
      EXPECT_EQ(together[i].tokens, alone[i].tokens) << "request " << i << ", " << paged_decode;
      EXPECT_EQ(together[i].tokens.size(), 6u);
    }
  }
}

// A long prompt's last piece near the end of the context (1,024 tokens for the fixture) beside a
// wider new prompt in the same step: padded to that width, the piece would pass the context's end,
// so it prefills in a forward of its own. Before, the step failed and every request in it ended
// with an error, the one decoding beside them included.
TEST(InferenceEngineTest, APieceNearTheContextEndBesideAWiderPromptPrefillsApart) {
  Fixture f;
  const std::vector<GenerationRequest> requests = {Greedy(RandomPrompt(10, 3), "", 12),
                                                   Greedy(RandomPrompt(1000, 1), "", 5),
                                                   Greedy(RandomPrompt(300, 2), "", 5)};
  std::vector<Result> alone;
  for (const auto& r : requests) alone.push_back(f.Alone(r));
  InferenceEngineOptions options = Fixture::Small();
  options.scheduler.token_budget = 900;
  options.scheduler.prefill_chunk = 900;
  auto engine = f.Engine(options);
  std::vector<Result> together(requests.size());
  ASSERT_TRUE(engine->Submit(requests[0], Fixture::Collector(&together[0])).ok());
  ASSERT_TRUE(engine->Step().ok());  // the first request decodes from here on
  for (size_t i = 1; i < requests.size(); ++i) {
    ASSERT_TRUE(engine->Submit(requests[i], Fixture::Collector(&together[i])).ok());
  }
  Fixture::StepAll(*engine);
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(together[i].reason, alone[i].reason) << "request " << i << ": " << together[i].status;
    EXPECT_EQ(together[i].tokens, alone[i].tokens) << "request " << i;
  }
}

TEST(InferenceEngineTest, PagedDecodePathGivesTheTokensOfTheGatherPath) {
  // Decode steps run through DecodeStep + the paged attention kernel's reference by default; the
  // Forward path (gather + scaled_dot_product_attention) is the independent check.
  Fixture f;
  const std::vector<GenerationRequest> requests = SixOnTwoAdaptersAndTheBase(f, 4, 5, 300);
  InferenceEngineOptions gather = Fixture::Small();
  gather.paged_decode = false;
  auto paged_engine = f.Engine();
  auto gather_engine = f.Engine(gather);
  const std::vector<Result> paged = f.Run(*paged_engine, requests);
  const std::vector<Result> reference = f.Run(*gather_engine, requests);
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(paged[i].tokens, reference[i].tokens) << "request " << i;
    EXPECT_EQ(paged[i].tokens.size(), 10u);
  }
}

TEST(InferenceEngineTest, TextDeltasConcatenateToTheDecodedTokens) {
  Fixture f;
  GenerationRequest r = Greedy({}, "", 20);
  r.prompt = "The quick brown fox";
  const Result res = f.Alone(r);
  ASSERT_EQ(res.tokens.size(), 20u);
  // The stream is the incremental detokenizer's text of the tokens as a continuation of the
  // prompt (a first word keeps its space): Decode's text, except that the random fixture emits
  // ill-formed byte-fallback runs, where sentencepiece's Decode replaces the whole run and the
  // stream only the ill-formed bytes (incremental_detokenizer.h).
  IncrementalDetokenizer detokenizer(f.tokenizer(), /*skip_special_tokens=*/true,
                                     /*continues_text=*/true);
  std::string expected;
  for (int32_t t : res.tokens) expected += detokenizer.Add(t);
  expected += detokenizer.Finish();
  EXPECT_EQ(res.text, expected);
  EXPECT_EQ(res.usage.prompt_tokens,
            static_cast<int64_t>(f.tokenizer().Encode(r.prompt, true).size()));
  EXPECT_EQ(res.usage.completion_tokens, 20);
  EXPECT_GT(res.usage.time_to_first_token_s, 0.0);
  EXPECT_EQ(res.events, 20);
}

TEST(InferenceEngineTest, SeededSamplingIsReproducibleInAnyBatch) {
  Fixture f;
  f.Publish("a", 4, 7);
  GenerationRequest seeded = Greedy(RandomPrompt(6, 1), "a", 16);
  seeded.sampling.temperature = 0.9f;
  seeded.sampling.top_p = 0.95f;
  seeded.sampling.seed = 1234;
  const Result first = f.Alone(seeded);
  const Result again = f.Alone(seeded);
  EXPECT_EQ(first.tokens, again.tokens);
  // In a batch, in the third row, beside sampled and greedy neighbours.
  GenerationRequest n1 = Greedy(RandomPrompt(9, 2), "", 10);
  n1.sampling.temperature = 1.0f;
  n1.sampling.seed = 99;
  GenerationRequest n2 = Greedy(RandomPrompt(4, 3), "a", 20);
  auto engine = f.Engine();
  const auto batch = f.Run(*engine, {n1, n2, seeded});
  EXPECT_EQ(batch[2].tokens, first.tokens);
  // Another seed draws other tokens (the test would notice a seed that is ignored).
  seeded.sampling.seed = 4321;
  EXPECT_NE(f.Alone(seeded).tokens, first.tokens);
}

TEST(InferenceEngineTest, TemperatureZeroIsGreedyArgmax) {
  Fixture f;
  GenerationRequest r = Greedy(RandomPrompt(5, 4), "", 10);
  r.sampling.repetition_penalty = 1.0f;
  r.sampling.temperature = 0.0f;
  r.sampling.top_p = 0.3f;  // ignored by greedy
  r.sampling.seed = 5;
  const Result res = f.Alone(r);
  // Reference: argmax of an uncached forward over the whole sequence, step by step.
  std::vector<int64_t> seq(r.prompt_ids.begin(), r.prompt_ids.end());
  std::vector<int32_t> expected;
  for (int i = 0; i < 10; ++i) {
    auto logits = f.model().Forward({torch::tensor(seq).view({1, -1}), {}}, nullptr, {});
    ASSERT_TRUE(logits.ok());
    const int64_t next = (*logits)[0][-1].argmax().item<int64_t>();
    expected.push_back(static_cast<int32_t>(next));
    seq.push_back(next);
  }
  EXPECT_EQ(res.tokens, expected);
}

TEST(InferenceEngineTest, HotSwapServesRunningRequestsOnTheOldVersionAndNewOnesOnTheNew) {
  Fixture f;
  ASSERT_EQ(f.Publish("swap", 4, 21), 1);
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 8; ++i) requests.push_back(Greedy(RandomPrompt(4 + i, 200 + i), "swap", 16));
  std::vector<Result> on_v1;
  for (const auto& r : requests) on_v1.push_back(f.Alone(r));

  auto engine = f.Engine();
  std::vector<Result> early(8), late(8);
  for (int i = 0; i < 8; ++i)
    ASSERT_TRUE(engine->Submit(requests[i], Fixture::Collector(&early[i])).ok());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(engine->Step().ok());
  for (const Result& r : early) EXPECT_FALSE(r.tokens.empty());  // they are streaming
  ASSERT_EQ(f.Publish("swap", 8, 22), 2);
  for (int i = 0; i < 8; ++i)
    ASSERT_TRUE(engine->Submit(requests[i], Fixture::Collector(&late[i])).ok());
  EXPECT_EQ(f.store().List().size(), 2u);  // v1 is alive while its requests run
  Fixture::StepAll(*engine);

  std::vector<Result> on_v2;
  for (const auto& r : requests) on_v2.push_back(f.Alone(r));
  int differ = 0;
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(early[i].tokens, on_v1[i].tokens) << "request " << i << " started on v1";
    EXPECT_EQ(late[i].tokens, on_v2[i].tokens) << "request " << i << " started after the swap";
    differ += on_v1[i].tokens != on_v2[i].tokens;
  }
  EXPECT_GT(differ, 0) << "v1 and v2 should generate different tokens";
  const auto list = f.store().List();
  ASSERT_EQ(list.size(), 1u);  // v1 freed when its last request ended
  EXPECT_EQ(list[0].version, 2);
}

// A request pinned to a version is served by it or refused, decided as the engine pins the
// adapter: the server's own check of the version, before, could be overtaken by a swap.
TEST(InferenceEngineTest, APinnedVersionServesOnlyWhileItIsCurrent) {
  Fixture f;
  ASSERT_EQ(f.Publish("pinned", 4, 61), 1);
  GenerationRequest on_v1 = Greedy(RandomPrompt(5, 610), "pinned", 4);
  on_v1.adapter_version = 1;
  const Result v1 = f.Alone(on_v1);
  EXPECT_EQ(v1.tokens.size(), 4u);
  EXPECT_EQ(v1.usage.adapter_version, 1);
  ASSERT_EQ(f.Publish("pinned", 4, 62), 2);
  auto engine = f.Engine();
  auto retired = engine->Submit(on_v1, nullptr);
  ASSERT_FALSE(retired.ok());
  EXPECT_EQ(retired.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(retired.status().message(),
            "adapter_version: 'pinned' serves version 2 to new requests; version 1 is retired "
            "(use 0)");
  GenerationRequest ahead = on_v1;
  ahead.adapter_version = 3;
  auto future = engine->Submit(ahead, nullptr);
  ASSERT_FALSE(future.ok());
  EXPECT_EQ(future.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(future.status().message().find("has no version 3; the newest is 2"), std::string::npos)
      << future.status();
  GenerationRequest on_v2 = on_v1;
  on_v2.adapter_version = 2;
  Result v2;
  ASSERT_TRUE(engine->Submit(on_v2, Fixture::Collector(&v2)).ok());
  Fixture::StepAll(*engine);
  EXPECT_EQ(v2.usage.adapter_version, 2);
  EXPECT_EQ(f.store().List().size(), 1u) << "the refused requests released their pins";
}

TEST(InferenceEngineTest, AnIdleEngineKeepsItsAdapterStackWhileTheVersionIsCurrent) {
  Fixture f;
  f.Publish("chat", 4, 41);
  const GenerationRequest turn = Greedy(RandomPrompt(9, 410), "chat", 8);
  auto engine = f.Engine();
  const Result first = f.Run(*engine, {turn})[0];
  EXPECT_EQ(engine->Stats().lora_stacks_built, 1);
  // The engine went idle; a base-model request, then the same adapter again: no new copy.
  const Result base = f.Run(*engine, {Greedy(RandomPrompt(9, 410), "", 8)})[0];
  const Result again = f.Run(*engine, {turn})[0];
  EXPECT_EQ(engine->Stats().lora_stacks_built, 1);
  EXPECT_EQ(again.tokens, first.tokens);
  EXPECT_NE(base.tokens, first.tokens) << "the adapter should change the tokens";
  // A new version while idle: the next request copies it and generates what v2 gives alone.
  ASSERT_EQ(f.Publish("chat", 4, 42), 2);
  const Result on_v2 = f.Run(*engine, {turn})[0];
  EXPECT_EQ(engine->Stats().lora_stacks_built, 2);
  EXPECT_EQ(on_v2.tokens, f.Alone(turn).tokens);
  EXPECT_NE(on_v2.tokens, first.tokens);
  EXPECT_EQ(engine->Stats().lora_stack_adapters, 1);
  // The stack's kernel tables only: it reads the store's copy of the adapter, no second one.
  EXPECT_GT(engine->Stats().lora_stack_bytes, 0);
  EXPECT_LT(engine->Stats().lora_stack_bytes, f.store().resident_bytes() / 10);
  // Unloaded while the engine is idle: the loop's call (on the store's retire signal) drops the
  // engine's copy too; the next request on another adapter builds a new stack.
  ASSERT_TRUE(f.store().Unload("chat").ok());
  EXPECT_EQ(engine->Stats().lora_stack_adapters, 1);
  engine->ReleaseIdleAdapters();
  EXPECT_EQ(engine->Stats().lora_stack_adapters, 0);
  EXPECT_EQ(engine->Stats().lora_stack_bytes, 0);
  f.Publish("other", 4, 43);
  const Result other = f.Run(*engine, {Greedy(RandomPrompt(9, 410), "other", 8)})[0];
  EXPECT_EQ(other.tokens.size(), 8u);
  EXPECT_EQ(engine->Stats().lora_stacks_built, 3);
}

// An adapter unloaded while base-model requests keep the engine busy leaves the device at the
// retire signal's call, not only once the engine goes idle; one still in use stays.
TEST(InferenceEngineTest, AnUnloadedAdaptersCopyGoesWhileBaseRequestsRun) {
  Fixture f;
  f.Publish("gone", 4, 51);
  f.Publish("kept", 4, 52);
  auto engine = f.Engine();
  Result on_gone, on_kept, base;
  ASSERT_TRUE(
      engine->Submit(Greedy(RandomPrompt(4, 510), "gone", 2), Fixture::Collector(&on_gone)).ok());
  ASSERT_TRUE(
      engine->Submit(Greedy(RandomPrompt(4, 512), "", 300), Fixture::Collector(&base)).ok());
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(engine->Step().ok());
  ASSERT_EQ(on_gone.finished_events, 1);
  ASSERT_EQ(engine->Stats().lora_stack_adapters, 1) << "kept for the next request on 'gone'";
  ASSERT_TRUE(f.store().Unload("gone").ok());
  engine->ReleaseIdleAdapters();  // what the loop does on the retire signal
  EXPECT_EQ(engine->Stats().lora_stack_adapters, 0);
  // Unloading an adapter still in use waits for its request, and its copy stays meanwhile.
  ASSERT_TRUE(
      engine->Submit(Greedy(RandomPrompt(4, 511), "kept", 20), Fixture::Collector(&on_kept)).ok());
  for (int i = 0; i < 100 && on_kept.tokens.empty(); ++i) ASSERT_TRUE(engine->Step().ok());
  ASSERT_EQ(engine->Stats().lora_stack_adapters, 1);
  std::thread unloader([&] { EXPECT_TRUE(f.store().Unload("kept").ok()); });
  for (int i = 0; i < 200 && f.store().Contains("kept"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  engine->ReleaseIdleAdapters();
  EXPECT_EQ(engine->Stats().lora_stack_adapters, 1) << "'kept' is still in use";
  for (int i = 0; i < 200 && on_kept.finished_events == 0; ++i) ASSERT_TRUE(engine->Step().ok());
  ASSERT_EQ(on_kept.finished_events, 1);
  unloader.join();
  // No retire signal comes after the last request on 'kept' ends: its step drops the copy.
  ASSERT_EQ(base.finished_events, 0) << "the base-model request still runs";
  EXPECT_EQ(engine->Stats().lora_stack_adapters, 0);
  Fixture::StepAll(*engine);
  EXPECT_EQ(base.tokens.size(), 300u);
  EXPECT_EQ(on_kept.tokens.size(), 20u);
}

TEST(InferenceEngineTest, UnloadWaitsForRunningRequestsAndThenFreesTheAdapter) {
  Fixture f;
  f.Publish("gone", 4, 31);
  auto engine = f.Engine();
  std::vector<Result> results(3);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(
        engine
            ->Submit(Greedy(RandomPrompt(5, 300 + i), "gone", 12), Fixture::Collector(&results[i]))
            .ok());
  }
  ASSERT_TRUE(engine->Step().ok());
  std::atomic<bool> unloaded{false};
  std::thread unloader([&] {
    EXPECT_TRUE(f.store().Unload("gone").ok());
    unloaded = true;
  });
  // New requests are refused as soon as the unload starts; running ones go on.
  for (int i = 0; i < 200 && f.store().Contains("gone"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  auto refused = engine->Submit(Greedy(RandomPrompt(5, 9), "gone", 4), nullptr);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(unloaded);
  Fixture::StepAll(*engine);
  unloader.join();
  EXPECT_TRUE(unloaded);
  for (const Result& r : results) EXPECT_EQ(r.tokens.size(), 12u);
  EXPECT_EQ(f.store().host_bytes(), 0);
  EXPECT_EQ(f.store().resident_bytes(), 0);
}

// More adapters in demand than can be resident (1 here; 8 by default): a request on another
// adapter is served while steady traffic keeps the resident one busy. It waited for ever: admitted
// beyond what could be resident and refused at every step, then passed over by every later
// request on the busy adapter.
TEST(InferenceEngineTest, ARequestOnAnotherAdapterIsServedUnderSteadyTrafficOnOne) {
  AdapterStoreOptions one_resident;
  one_resident.max_resident = 1;
  Fixture f(one_resident);
  f.Publish("busy", 4, 71);
  f.Publish("other", 4, 72);
  auto engine = f.Engine();
  std::vector<Result> busy(400);
  Result other;
  ASSERT_TRUE(
      engine->Submit(Greedy(RandomPrompt(4, 700), "busy", 4), Fixture::Collector(&busy[0])).ok());
  ASSERT_TRUE(engine->Step().ok());
  ASSERT_TRUE(
      engine->Submit(Greedy(RandomPrompt(4, 701), "other", 4), Fixture::Collector(&other)).ok());
  for (size_t i = 1; i < busy.size() && other.finished_events == 0; ++i) {
    ASSERT_TRUE(
        engine->Submit(Greedy(RandomPrompt(4, 702 + i), "busy", 4), Fixture::Collector(&busy[i]))
            .ok());
    ASSERT_TRUE(engine->Step().ok());
  }
  EXPECT_EQ(other.finished_events, 1) << "the request on 'other' never ran";
  EXPECT_EQ(other.tokens.size(), 4u);
  Fixture::StepAll(*engine);
}

}  // namespace
}  // namespace lorad::engine
