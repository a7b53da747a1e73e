// MultiLoraApplier: one forward whose rows use three adapters of different ranks and no adapter
// gives each row the logits of a forward with that row's adapter alone (SingleLoraApplier, the
// parity-tested path) or of the base.
#include "engine/lora/multi_lora_applier.h"

#include <gtest/gtest.h>

#include <cstdlib>

#include "engine/model/llama_model.h"
#include "tests/unit/engine/tiny_model.h"

namespace lorad::engine {
namespace {

// A LoRA adapter with random non-zero A and B (PEFT's init leaves B zero, which would hide B).
LoraAdapter RandomAdapter(const ModelConfig& model, int r, std::vector<std::string> targets,
                          uint64_t seed) {
  LoraConfig config;
  config.r = r;
  config.alpha = 2.0 * r;
  config.target_modules = std::move(targets);
  auto adapter = LoraAdapter::Init(model, config, seed);
  EXPECT_TRUE(adapter.ok()) << adapter.status();
  torch::manual_seed(seed);
  for (auto& [path, pair] : adapter->layers) {
    pair.b = 0.1 * torch::randn_like(pair.b);
  }
  return *std::move(adapter);
}

TEST(MultiLoraApplierTest, EveryRowGetsItsOwnAdapterWhateverTheRanks) {
  auto model = test_fixtures::LoadTinyModel();
  ASSERT_NE(model, nullptr);
  const ModelConfig& c = model->config();
  const std::vector<LoraAdapter> adapters = {
      RandomAdapter(c, 2, {"q_proj", "v_proj"}, 1),
      RandomAdapter(c, 8, KnownLoraTargets(), 2),
      RandomAdapter(c, 4, {"o_proj", "down_proj", "k_proj"}, 3),
  };
  auto stack = LoraStack::Build({&adapters[0], &adapters[1], &adapters[2]}, c.num_hidden_layers,
                                torch::kCPU, torch::kFloat);
  ASSERT_TRUE(stack.ok()) << stack.status();
  // Rows: adapter 1, none, adapter 0, adapter 2, adapter 1 again; prompts of different lengths.
  const std::vector<int32_t> slots = {1, -1, 0, 2, 1};
  const std::vector<int64_t> lengths = {7, 3, 5, 7, 1};
  const torch::Tensor ids = torch::randint(3, c.vocab_size, {5, 7}, torch::kLong);
  MultiLoraApplier applier(*stack, slots, torch::kCPU);
  ForwardOptions mixed;
  mixed.lora = &applier;
  auto logits = model->Forward({ids, lengths}, nullptr, mixed);
  ASSERT_TRUE(logits.ok()) << logits.status();

  for (int64_t b = 0; b < 5; ++b) {
    ForwardOptions alone;
    if (slots[b] >= 0) alone.adapter = &adapters[slots[b]];
    const torch::Tensor row = ids[b].narrow(0, 0, lengths[b]).view({1, -1});
    auto expected = model->Forward({row, {}}, nullptr, alone);
    ASSERT_TRUE(expected.ok()) << expected.status();
    const double diff =
        ((*logits)[b].narrow(0, 0, lengths[b]) - (*expected)[0]).abs().max().item<double>();
    EXPECT_LT(diff, 1e-5) << "row " << b << " (slot " << slots[b] << ")";
  }
  // The adapters change the logits: the test would notice a delta applied to the wrong row.
  ForwardOptions base;
  auto plain = model->Forward({ids[0].view({1, -1}), {}}, nullptr, base);
  ASSERT_TRUE(plain.ok());
  EXPECT_GT(((*logits)[0] - (*plain)[0]).abs().max().item<double>(), 1e-3);
}

// The CUDA kernels' view of a stack (kernels/lora_bgmv.h's LoraAdapterTable): per projection,
// slot s's A and B pointers at the adapter's own tensors (not a copy), its own rank (0 and null
// pointers where it does not target the projection) and its scaling (0 where not).
TEST(MultiLoraApplierTest, KernelTablesPointAtEachAdaptersOwnTensors) {
  auto model = test_fixtures::LoadTinyModel();
  ASSERT_NE(model, nullptr);
  const ModelConfig& c = model->config();
  const std::vector<LoraAdapter> adapters = {RandomAdapter(c, 2, {"q_proj", "down_proj"}, 4),
                                             RandomAdapter(c, 8, {"q_proj", "v_proj"}, 5)};
  auto stack = LoraStack::Build({&adapters[0], &adapters[1]}, c.num_hidden_layers, torch::kCPU,
                                torch::kFloat);
  ASSERT_TRUE(stack.ok()) << stack.status();
  const std::vector<double> scaling = {adapters[0].config.scaling(), adapters[1].config.scaling()};
  const std::vector<int32_t> rank = {2, 8};
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    for (const auto& [projection, targeted] : std::vector<std::pair<Projection, std::vector<bool>>>{
             {Projection::kQ, {true, true}},
             {Projection::kV, {false, true}},
             {Projection::kDown, {true, false}}}) {
      const LoraStack::Entry& e = (*stack)->entry(layer, projection);
      ASSERT_TRUE(e.a_pointers.defined());
      EXPECT_EQ(e.max_rank, targeted[1] ? 8 : 2);
      for (int64_t s = 0; s < 2; ++s) {
        const std::string at = "layer " + std::to_string(layer) + ", slot " + std::to_string(s);
        if (targeted[s]) {
          const LoraPair& pair = adapters[s].layers.at(ProjectionPath(layer, projection));
          EXPECT_EQ(e.a_pointers[s].item<int64_t>(), reinterpret_cast<int64_t>(pair.a.data_ptr()))
              << at;
          EXPECT_EQ(e.b_pointers[s].item<int64_t>(), reinterpret_cast<int64_t>(pair.b.data_ptr()))
              << at;
          EXPECT_EQ(e.ranks[s].item<int32_t>(), rank[s]) << at;
          EXPECT_EQ(e.scales_f32[s].item<float>(), static_cast<float>(scaling[s])) << at;
        } else {
          EXPECT_FALSE(e.a[s].defined()) << at;
          EXPECT_EQ(e.a_pointers[s].item<int64_t>(), 0) << at;
          EXPECT_EQ(e.b_pointers[s].item<int64_t>(), 0) << at;
          EXPECT_EQ(e.ranks[s].item<int32_t>(), 0) << at;
          EXPECT_EQ(e.scales_f32[s].item<float>(), 0.0f) << at;
        }
      }
      EXPECT_EQ(e.a_pointers.numel(), 2);
    }
    EXPECT_FALSE((*stack)->entry(layer, Projection::kO).targeted());  // no adapter targets it
  }
}

// Adapters of very different ranks side by side: the stack holds no copy of them, padded or not
// (it held every adapter again, padded to the largest rank: one r=64 beside r=2 made the r=2
// slot 32 times its size), only the kernels' tables.
TEST(MultiLoraApplierTest, TheStackSharesTheAdaptersInsteadOfCopyingThem) {
  auto model = test_fixtures::LoadTinyModel();
  ASSERT_NE(model, nullptr);
  const ModelConfig& c = model->config();
  const std::vector<LoraAdapter> adapters = {RandomAdapter(c, 2, KnownLoraTargets(), 8),
                                             RandomAdapter(c, 64, KnownLoraTargets(), 9)};
  int64_t adapter_bytes = 0;
  for (const LoraAdapter& adapter : adapters) {
    for (const auto& [path, pair] : adapter.layers) {
      adapter_bytes += static_cast<int64_t>(pair.a.nbytes() + pair.b.nbytes());
    }
  }
  auto stack = LoraStack::Build({&adapters[0], &adapters[1]}, c.num_hidden_layers, torch::kCPU,
                                torch::kFloat);
  ASSERT_TRUE(stack.ok()) << stack.status();
  // The tables: per entry two pointers, a rank and a scale a slot (7 projections x layers).
  const int64_t tables = 7 * c.num_hidden_layers * 2 * (8 + 8 + 4 + 4);
  EXPECT_EQ((*stack)->bytes(), tables);
  EXPECT_LT((*stack)->bytes(), adapter_bytes / 100);
  // In another dtype the stack must convert, and counts its copies.
  auto bf16 = LoraStack::Build({&adapters[0], &adapters[1]}, c.num_hidden_layers, torch::kCPU,
                               torch::kBFloat16);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ((*bf16)->bytes(), tables + adapter_bytes / 2);
}

// bf16 rows (the prefill path on a GPU): the delta scaled by the adapter's fp32 scaling, as PEFT
// multiplies by its float scaling. Rounded to bf16, alpha 16 / r 12 = 1.3333 became 1.3359, every
// delta 0.19% too large (decode's kernels take the fp32 scale). Measured as the least-squares
// ratio of lorad's delta to PEFT's over 8,192 outputs (bf16 rounding noise averages out).
TEST(MultiLoraApplierTest, Bf16RowsScaleTheirDeltaByTheFloatScalingAsPeftDoes) {
  auto model = test_fixtures::LoadTinyModel();
  ASSERT_NE(model, nullptr);
  const ModelConfig& c = model->config();
  LoraAdapter adapter = RandomAdapter(c, 12, {"q_proj"}, 6);
  adapter.config.alpha = 16;
  const double scaling = adapter.config.scaling();
  ASSERT_NE(static_cast<float>(scaling),
            torch::tensor(static_cast<float>(scaling)).to(torch::kBFloat16).item<float>());
  auto stack = LoraStack::Build({&adapter}, c.num_hidden_layers, torch::kCPU, torch::kBFloat16);
  ASSERT_TRUE(stack.ok()) << stack.status();
  MultiLoraApplier applier(*stack, std::vector<int32_t>{0}, torch::kCPU);
  torch::manual_seed(7);
  const torch::Tensor x = torch::randn({1, 64, c.hidden_size}).to(torch::kBFloat16);
  const LoraPair& pair = adapter.layers.at(ProjectionPath(0, Projection::kQ));
  // PEFT: lora_B(lora_A(x)) in bf16, times the Python float scaling (computed in fp32).
  const torch::Tensor h = torch::matmul(x, pair.a.to(torch::kBFloat16).t());
  const torch::Tensor peft =
      (torch::matmul(h, pair.b.to(torch::kBFloat16).t()) * scaling).to(torch::kFloat);
  const torch::Tensor zero = torch::zeros({1, 64, pair.b.size(0)}, torch::kBFloat16);
  for (const bool in_place : {true, false}) {  // baddbmm into y, or y + delta (y needs grad)
    torch::Tensor y = in_place ? zero.clone() : zero.clone().requires_grad_(true);
    const torch::Tensor got = applier.Apply(0, Projection::kQ, x, y).detach().to(torch::kFloat);
    const double ratio = (got * peft).sum().item<double>() / (peft * peft).sum().item<double>();
    EXPECT_NEAR(ratio, 1.0, 5e-4) << (in_place ? "in place" : "y + delta");
  }
}

TEST(MultiLoraApplierTest, AdaptersThatDisagreeOnAShapeAreRefused) {
  LoraAdapter a, b;
  a.config.r = b.config.r = 2;
  a.layers["model.layers.0.self_attn.q_proj"] = {torch::zeros({2, 8}), torch::zeros({8, 2})};
  b.layers["model.layers.0.self_attn.q_proj"] = {torch::zeros({2, 6}), torch::zeros({8, 2})};
  auto stack = LoraStack::Build({&a, &b}, 1, torch::kCPU, torch::kFloat);
  EXPECT_EQ(stack.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(stack.status().message().find("q_proj"), std::string::npos) << stack.status();
}

}  // namespace
}  // namespace lorad::engine
