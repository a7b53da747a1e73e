// Sampler on the CPU: greedy, seeded reproducibility across batches, the sampled distribution,
// logprobs, and the errors a client sees for bad parameters.
#include "engine/infer/sampler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace lorad::engine {
namespace {

using ::testing::HasSubstr;

std::vector<int32_t> Tokens(const std::vector<SampledToken>& out) {
  std::vector<int32_t> t;
  for (const auto& s : out) t.push_back(s.token);
  return t;
}

std::vector<int32_t> Argmax(const torch::Tensor& logits) {
  const torch::Tensor a = logits.argmax(-1).to(torch::kInt32).contiguous();
  return std::vector<int32_t>(a.data_ptr<int32_t>(), a.data_ptr<int32_t>() + a.numel());
}

TEST(Sampler, TemperatureZeroIsGreedy) {
  torch::manual_seed(1);
  const torch::Tensor logits = torch::randn({6, 1000});
  std::vector<SampleRow> rows(6);
  for (size_t b = 0; b < rows.size(); ++b) rows[b].seed = 100 + b;  // seeds do not matter
  auto out = Sampler().Sample(logits, rows);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(Tokens(*out), Argmax(logits));
}

TEST(Sampler, TopKOneIsGreedyAtAnyTemperature) {
  torch::manual_seed(2);
  const torch::Tensor logits = torch::randn({6, 1000});
  std::vector<SampleRow> rows(6);
  for (size_t b = 0; b < rows.size(); ++b) {
    rows[b].params.temperature = 1.5f;
    rows[b].params.top_k = 1;
    rows[b].seed = 7 * b + 1;
    rows[b].step = b;
  }
  auto out = Sampler().Sample(logits, rows);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(Tokens(*out), Argmax(logits));
}

// A row whose logits hold NaN (a model that overflowed) comes back as kNanLogitsToken and the
// batch's other rows as they would alone. The CPU top-p loop never ended on a NaN (the engine's
// loop hung with it); the GPU drew the NaN's index as if it were text.
TEST(Sampler, ARowOfNanLogitsIsReportedAndTheOthersAreSampled) {
  torch::manual_seed(4);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  torch::Tensor logits = torch::randn({3, 200});
  logits[0][0] = nan;    // one NaN, sampled with top-p
  logits[1].fill_(nan);  // a whole row, greedy
  std::vector<SampleRow> rows(3);
  for (int b : {0, 2}) {
    rows[b].params.temperature = 1.0f;
    rows[b].params.top_p = 0.9f;
    rows[b].seed = 11 + b;
  }
  auto out = Sampler().Sample(logits, rows);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[0].token, kNanLogitsToken);
  EXPECT_EQ((*out)[1].token, kNanLogitsToken);
  auto alone = Sampler().Sample(logits.slice(0, 2, 3), {rows[2]});
  ASSERT_TRUE(alone.ok()) << alone.status();
  EXPECT_EQ((*out)[2].token, (*alone)[0].token);
  EXPECT_GE((*out)[2].token, 0);
  // With log-probabilities asked for (by the NaN row and another): the NaN rows get none, the
  // other its own (a token of -1 was gathered: an exception here, a device assert on CUDA).
  for (SampleRow& r : rows) r.params.logprobs = 2;
  out = Sampler().Sample(logits, rows);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[0].token, kNanLogitsToken);
  EXPECT_TRUE((*out)[0].top_logprobs.empty());
  EXPECT_EQ((*out)[2].token, (*alone)[0].token);
  EXPECT_EQ((*out)[2].top_logprobs.size(), 2u);
}

TEST(Sampler, LeavesTheCallersLogitsUnchanged) {
  torch::manual_seed(3);
  const torch::Tensor logits = torch::randn({2, 64});
  const torch::Tensor copy = logits.clone();
  std::vector<SampleRow> rows(2);
  const std::vector<int32_t> generated = {1, 2, 3};
  for (auto& r : rows) {
    r.params.temperature = 0.7f;
    r.params.top_p = 0.5f;
    r.params.repetition_penalty = 1.5f;
    r.generated = generated;
  }
  ASSERT_TRUE(Sampler().Sample(logits, rows).ok());
  EXPECT_TRUE(torch::equal(logits, copy));
}

// Decodes `steps` tokens for the row at `index` of a batch of `batch_size` rows; the other rows
// have their own logits, parameters, seeds and histories. Logits come from a generator keyed by
// the step, so the row sees the same logits whatever its position.
std::vector<int32_t> DecodeSeededRow(int batch_size, int index, uint64_t seed, int steps) {
  SamplingParams mine;
  mine.temperature = 0.9f;
  mine.top_p = 0.95f;
  mine.top_k = 200;
  mine.repetition_penalty = 1.1f;
  mine.frequency_penalty = 0.2f;
  mine.seed = seed;
  constexpr int64_t kVocab = 512;
  const std::vector<int32_t> prompt = {5, 9, 5, 300};
  std::vector<std::vector<int32_t>> generated(batch_size);
  std::vector<int32_t> result;
  for (int step = 0; step < steps; ++step) {
    torch::Tensor logits = torch::empty({batch_size, kVocab});
    std::vector<SampleRow> rows(batch_size);
    for (int b = 0; b < batch_size; ++b) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(b == index ? 1000 + step : 7 * b + step);
      logits[b] = torch::randn({kVocab}, gen) * 3.0;
      SampleRow& r = rows[b];
      if (b == index) {
        r.params = mine;
        r.seed = ResolveSeed(mine);
      } else {
        r.params.temperature = 0.5f + 0.1f * b;
        r.params.min_p = 0.05f;
        r.seed = 31 * b + 17;
      }
      r.step = step;
      r.prompt = prompt;
      r.generated = generated[b];
    }
    auto out = Sampler().Sample(logits, rows);
    EXPECT_TRUE(out.ok()) << out.status();
    if (!out.ok()) return {};
    for (int b = 0; b < batch_size; ++b) generated[b].push_back((*out)[b].token);
    result.push_back((*out)[index].token);
  }
  return result;
}

TEST(Sampler, SeededRowIsTheSameAloneInABatchAndAtAnyIndex) {
  const std::vector<int32_t> alone = DecodeSeededRow(1, 0, 42, 30);
  ASSERT_EQ(alone.size(), 30u);
  EXPECT_EQ(DecodeSeededRow(8, 0, 42, 30), alone);
  EXPECT_EQ(DecodeSeededRow(8, 5, 42, 30), alone);
}

TEST(Sampler, DifferentSeedsGiveDifferentTokens) {
  EXPECT_NE(DecodeSeededRow(1, 0, 42, 30), DecodeSeededRow(1, 0, 43, 30));
}

TEST(Sampler, UnseededRequestsGetFreshSeeds) {
  const SamplingParams unseeded;
  EXPECT_NE(ResolveSeed(unseeded), ResolveSeed(unseeded));
  SamplingParams seeded;
  seeded.seed = 9;
  EXPECT_EQ(ResolveSeed(seeded), 9u);
}

// 20k draws of one seed (steps 0..19999, so deterministic) from a fixed 4-token distribution.
TEST(Sampler, SampledFrequenciesMatchTheProbabilities) {
  const std::vector<double> p = {0.1, 0.2, 0.3, 0.4};
  constexpr int kDraws = 20000;
  const torch::Tensor logits =
      torch::log(torch::tensor(p, torch::kDouble)).to(torch::kFloat).expand({kDraws, 4});
  std::vector<SampleRow> rows(kDraws);
  for (int i = 0; i < kDraws; ++i) {
    rows[i].params.temperature = 1.0f;
    rows[i].seed = 123;
    rows[i].step = i;
  }
  auto out = Sampler().Sample(logits, rows);
  ASSERT_TRUE(out.ok()) << out.status();
  std::vector<int> counts(4, 0);
  for (const auto& s : *out) ++counts[s.token];
  for (int j = 0; j < 4; ++j) {
    EXPECT_NEAR(counts[j] / static_cast<double>(kDraws), p[j], 0.02) << "token " << j;
  }
}

TEST(Sampler, RawLogprobsAreLogSoftmaxOfTheModelsLogits) {
  torch::manual_seed(4);
  const torch::Tensor logits = torch::randn({3, 50}) * 2.0;
  std::vector<SampleRow> rows(3);
  const std::vector<int32_t> generated = {0, 1, 2};
  for (size_t b = 0; b < rows.size(); ++b) {
    rows[b].params.temperature = 0.7f;
    rows[b].params.repetition_penalty = 1.4f;  // changes the distribution, not raw logprobs
    rows[b].params.logprobs = static_cast<int32_t>(b) * 2;  // 0, 2, 4
    rows[b].seed = b;
    rows[b].generated = generated;
  }
  auto out = Sampler(LogprobsMode::kRaw).Sample(logits, rows);
  ASSERT_TRUE(out.ok()) << out.status();
  const torch::Tensor want = torch::log_softmax(logits, -1);
  EXPECT_TRUE((*out)[0].top_logprobs.empty());
  for (size_t b = 1; b < rows.size(); ++b) {
    const SampledToken& s = (*out)[b];
    EXPECT_NEAR(s.logprob, want[b][s.token].item<float>(), 1e-6);
    ASSERT_EQ(s.top_logprobs.size(), 2 * b);
    const auto [values, ids] = want[b].topk(static_cast<int64_t>(2 * b));
    for (size_t i = 0; i < s.top_logprobs.size(); ++i) {
      EXPECT_EQ(s.top_logprobs[i].token, ids[i].item<int64_t>());
      EXPECT_NEAR(s.top_logprobs[i].logprob, values[i].item<float>(), 1e-6);
    }
  }
}

TEST(Sampler, ProcessedLogprobsFollowTemperatureAndFilters) {
  const std::vector<double> p = {0.1, 0.2, 0.3, 0.4};
  const torch::Tensor logits =
      torch::log(torch::tensor(p, torch::kDouble)).to(torch::kFloat).unsqueeze(0);
  SampleRow row;
  row.params.temperature = 0.5f;
  row.params.top_k = 2;
  row.params.logprobs = 4;
  auto out = Sampler(LogprobsMode::kProcessed).Sample(logits, {row});
  ASSERT_TRUE(out.ok()) << out.status();
  // Temperature 0.5 squares the probabilities; top-k 2 keeps 0.3 and 0.4: 9/25 and 16/25.
  // The two tokens top-k removed are not candidates: not listed (they were, as -inf).
  const auto& top = (*out)[0].top_logprobs;
  ASSERT_EQ(top.size(), 2u);
  EXPECT_EQ(top[0].token, 3);
  EXPECT_NEAR(top[0].logprob, std::log(16.0 / 25.0), 1e-5);
  EXPECT_EQ(top[1].token, 2);
  EXPECT_NEAR(top[1].logprob, std::log(9.0 / 25.0), 1e-5);
  EXPECT_TRUE((*out)[0].token == 2 || (*out)[0].token == 3);
}

TEST(Sampler, AcceptsHalfPrecisionLogits) {
  torch::manual_seed(5);
  const torch::Tensor logits = torch::randn({4, 300}).to(torch::kBFloat16);
  auto out = Sampler().Sample(logits, std::vector<SampleRow>(4));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(Tokens(*out), Argmax(logits.to(torch::kFloat)));
}

TEST(Sampler, BadParametersNameTheFieldAndItsRange) {
  EXPECT_TRUE(SamplingParams().Validate(4096).ok());
  struct Case {
    std::function<void(SamplingParams&)> set;
    const char* field;
    const char* range;
  };
  const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
  const Case cases[] = {
      {[=](SamplingParams& p) { p.max_new_tokens = 0; }, "max_new_tokens", "[1, 4096]"},
      {[=](SamplingParams& p) { p.max_new_tokens = 4097; }, "max_new_tokens", "[1, 4096]"},
      {[=](SamplingParams& p) { p.temperature = -0.5f; }, "temperature", ">= 0"},
      {[=](SamplingParams& p) { p.temperature = nan; }, "temperature", "finite"},
      {[=](SamplingParams& p) { p.temperature = inf; }, "temperature", "finite"},
      {[=](SamplingParams& p) { p.top_k = -1; }, "top_k", ">= 0"},
      {[=](SamplingParams& p) { p.top_p = 0.0f; }, "top_p", "(0, 1]"},
      {[=](SamplingParams& p) { p.top_p = 1.5f; }, "top_p", "(0, 1]"},
      {[=](SamplingParams& p) { p.top_p = nan; }, "top_p", "(0, 1]"},
      {[=](SamplingParams& p) { p.min_p = 1.0f; }, "min_p", "[0, 1)"},
      {[=](SamplingParams& p) { p.min_p = -0.1f; }, "min_p", "[0, 1)"},
      {[=](SamplingParams& p) { p.repetition_penalty = 0.0f; }, "repetition_penalty",
       "[1e-6, 1e6]"},
      {[=](SamplingParams& p) { p.repetition_penalty = inf; }, "repetition_penalty", "[1e-6, 1e6]"},
      {[=](SamplingParams& p) { p.repetition_penalty = nan; }, "repetition_penalty", "[1e-6, 1e6]"},
      // Past float's range once a logit is divided by it (the distribution turned NaN).
      {[=](SamplingParams& p) { p.repetition_penalty = 1e-39f; }, "repetition_penalty",
       "[1e-6, 1e6]"},
      {[=](SamplingParams& p) { p.repetition_penalty = 2e6f; }, "repetition_penalty",
       "[1e-6, 1e6]"},
      {[=](SamplingParams& p) { p.presence_penalty = nan; }, "presence_penalty", "[-2, 2]"},
      {[=](SamplingParams& p) { p.presence_penalty = 2.5f; }, "presence_penalty", "[-2, 2]"},
      {[=](SamplingParams& p) { p.frequency_penalty = -inf; }, "frequency_penalty", "[-2, 2]"},
      {[=](SamplingParams& p) { p.logprobs = 21; }, "logprobs", "[0, 20]"},
      {[=](SamplingParams& p) { p.logprobs = -1; }, "logprobs", "[0, 20]"},
  };
  for (const Case& c : cases) {
    SamplingParams p;
    c.set(p);
    const absl::Status s = p.Validate(/*max_new_tokens_limit=*/4096);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.field));
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.range)) << s.message();
  }
}

TEST(Sampler, RejectsBadInputsWithoutCrashing) {
  const Sampler sampler;
  std::vector<SampleRow> two(2);
  auto wrong_rows = sampler.Sample(torch::zeros({3, 10}), two);
  EXPECT_EQ(wrong_rows.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(wrong_rows.status().message()), HasSubstr("3 rows"));

  auto wrong_rank = sampler.Sample(torch::zeros({10}), two);
  EXPECT_THAT(std::string(wrong_rank.status().message()), HasSubstr("[batch, vocab]"));

  auto wrong_dtype = sampler.Sample(torch::zeros({2, 10}, torch::kInt64), two);
  EXPECT_THAT(std::string(wrong_dtype.status().message()), HasSubstr("fp32, bf16 or fp16"));

  const std::vector<int32_t> outside = {3, 10};
  two[1].params.repetition_penalty = 1.2f;
  two[1].generated = outside;
  auto bad_token = sampler.Sample(torch::zeros({2, 10}), two);
  EXPECT_EQ(bad_token.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad_token.status().message()),
              HasSubstr("row 1: generated token 10 is outside the vocabulary [0, 10)"));

  two[1].generated = {};
  two[0].params.top_p = 0.0f;
  auto bad_param = sampler.Sample(torch::zeros({2, 10}), two);
  EXPECT_THAT(std::string(bad_param.status().message()), HasSubstr("row 0"));
  EXPECT_THAT(std::string(bad_param.status().message()), HasSubstr("top_p"));
}

}  // namespace
}  // namespace lorad::engine
