// The sampling kernels' CPU specification and the Sampler against transformers' logits
// processors (RepetitionPenalty, Temperature, TopK, TopP, MinP), OpenAI's penalty formula, and
// the processor chain transformers' generate() builds (tests/parity/reference_sampling.py).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "engine/infer/sampler.h"
#include "kernels/sampling.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

using nlohmann::json;

// Values are fp32 ops in the same order as torch's; 1e-6 is the brief's bound (relative for
// logits above 1, where one ulp is larger).
constexpr float kTolerance = 1e-6f;

json Load(const std::string& name) {
  const std::string path = std::string(std::getenv("LORAD_PARITY_DIR")) + "/sampling/" + name;
  std::ifstream in(path);
  EXPECT_TRUE(in) << "missing reference " << path;
  return in ? json::parse(in) : json();
}

// null stands for -inf (JSON has no infinities).
std::vector<float> Floats(const json& values) {
  std::vector<float> out;
  out.reserve(values.size());
  for (const auto& v : values) {
    out.push_back(v.is_null() ? -std::numeric_limits<float>::infinity() : v.get<float>());
  }
  return out;
}

void ExpectLogitsEqual(const std::vector<float>& got, const std::vector<float>& want,
                       const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isinf(want[i])) {
      EXPECT_EQ(got[i], want[i]) << what << " index " << i << " (transformers removed it)";
    } else {
      EXPECT_NEAR(got[i], want[i], kTolerance * std::max(1.0f, std::fabs(want[i])))
          << what << " index " << i;
    }
  }
}

// The kernels' row for transformers-style parameters: warpers only run with a temperature, so a
// case with a warper and no temperature gets 1 (x / 1 == x).
kernels::SamplingRow RowFor(const json& params) {
  kernels::SamplingRow row;
  row.top_k = params.value("top_k", 0);
  row.top_p = params.value("top_p", 1.0f);
  row.min_p = params.value("min_p", 0.0f);
  const bool warps = row.top_k > 0 || row.top_p < 1.0f || row.min_p > 0.0f;
  row.temperature = params.value("temperature", warps ? 1.0f : 0.0f);
  row.repetition_penalty = params.value("repetition_penalty", 1.0f);
  row.presence_penalty = params.value("presence_penalty", 0.0f);
  row.frequency_penalty = params.value("frequency_penalty", 0.0f);
  return row;
}

// Penalties then warpers on a batch whose rows share one parameter set.
void Process(std::vector<float>& logits, int64_t batch, int64_t vocab, const json& params,
             const std::vector<std::vector<int32_t>>& prompts,
             const std::vector<std::vector<int32_t>>& generated) {
  const std::vector<kernels::SamplingRow> rows(batch, RowFor(params));
  std::vector<int32_t> tokens;
  std::vector<int64_t> row_begin, generated_begin;
  for (int64_t b = 0; b < batch; ++b) {
    row_begin.push_back(static_cast<int64_t>(tokens.size()));
    tokens.insert(tokens.end(), prompts[b].begin(), prompts[b].end());
    generated_begin.push_back(static_cast<int64_t>(tokens.size()));
    tokens.insert(tokens.end(), generated[b].begin(), generated[b].end());
  }
  row_begin.push_back(static_cast<int64_t>(tokens.size()));
  const kernels::TokenHistory history{tokens.data(), row_begin.data(), generated_begin.data()};
  kernels::sampling_penalties_cpu(logits.data(), batch, vocab, rows.data(), history);
  kernels::sampling_warp_cpu(logits.data(), batch, vocab, rows.data());
}

TEST(SamplingParity, EachProcessorEqualsTransformers) {
  const json cases = Load("cases.json");
  ASSERT_FALSE(cases.empty());
  for (const auto& c : cases) {
    const int64_t batch = c["batch"], vocab = c["vocab"];
    std::vector<float> logits = Floats(c["logits"]);
    Process(logits, batch, vocab, c["params"], c["prompt"].get<std::vector<std::vector<int32_t>>>(),
            c["generated"].get<std::vector<std::vector<int32_t>>>());
    ExpectLogitsEqual(logits, Floats(c["expected"]), c["name"].get<std::string>());
  }
}

TEST(SamplingParity, GreedyWithRepetitionPenaltyEqualsTransformersOver20Steps) {
  const json ref = Load("greedy.json");
  ASSERT_FALSE(ref.empty());
  const int64_t batch = ref["batch"], vocab = ref["vocab"];
  const auto prompts = ref["prompt"].get<std::vector<std::vector<int32_t>>>();
  const auto want = ref["tokens"].get<std::vector<std::vector<int32_t>>>();
  std::vector<std::vector<int32_t>> generated(batch);
  const Sampler sampler;
  for (size_t step = 0; step < ref["logits"].size(); ++step) {
    std::vector<float> logits = Floats(ref["logits"][step]);
    const torch::Tensor t = torch::from_blob(logits.data(), {batch, vocab}, torch::kFloat);
    std::vector<SampleRow> rows(batch);
    for (int64_t b = 0; b < batch; ++b) {
      rows[b].params.repetition_penalty = ref["penalty"].get<float>();
      rows[b].step = step;
      rows[b].prompt = prompts[b];
      rows[b].generated = generated[b];
    }
    auto out = sampler.Sample(t, rows);
    ASSERT_TRUE(out.ok()) << out.status();
    for (int64_t b = 0; b < batch; ++b) {
      EXPECT_EQ((*out)[b].token, want[b][step]) << "row " << b << " step " << step;
      generated[b].push_back(want[b][step]);  // follow transformers' sequence either way
    }
  }
}

// generate() on the tiny model recorded each step's raw logits and its chain's output scores:
// the same settings here give the same scores at every step, so the order and the defaults of
// the chain are generate()'s. Greedy runs also pick generate()'s token.
TEST(SamplingParity, GenerateProcessorChainEqualsTransformers) {
  const json runs = Load("generate.json");
  ASSERT_FALSE(runs.empty());
  for (const auto& run : runs) {
    const std::string name = run["name"];
    const int64_t vocab = run["vocab"];
    const std::vector<int32_t> prompt = run["prompt"].get<std::vector<int32_t>>();
    const std::vector<int32_t> tokens = run["tokens"].get<std::vector<int32_t>>();
    ASSERT_EQ(run["logits"].size(), tokens.size()) << name;
    for (size_t step = 0; step < tokens.size(); ++step) {
      const std::vector<int32_t> generated(tokens.begin(), tokens.begin() + step);
      std::vector<float> logits = Floats(run["logits"][step]);
      Process(logits, 1, vocab, run["params"], {prompt}, {generated});
      ExpectLogitsEqual(logits, Floats(run["scores"][step]),
                        name + " step " + std::to_string(step));
      if (run["do_sample"].get<bool>()) continue;
      std::vector<float> raw = Floats(run["logits"][step]);
      SampleRow row;
      row.params.repetition_penalty = run["params"]["repetition_penalty"].get<float>();
      row.prompt = prompt;
      row.generated = generated;
      auto out = Sampler().Sample(torch::from_blob(raw.data(), {1, vocab}, torch::kFloat), {row});
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_EQ((*out)[0].token, tokens[step]) << name << " step " << step;
    }
  }
}

}  // namespace
}  // namespace lorad::engine
