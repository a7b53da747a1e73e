// The optimizers' memory: 8-bit AdamW keeps both moments in 8 bits with one fp32 scale per 256
// values, so its state takes at most 26% of fp32 AdamW's (the trainer issue's bound), counted
// after a real step on the LoRA shapes of a Llama-3-8B layer.
#include "engine/train/optimizer.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

namespace lorad::engine {
namespace {

std::vector<torch::Tensor> LoraShapedParams() {
  // r=16 on q, k, v, o, gate, up, down of one Llama-3-8B layer: A [16, in], B [out, 16].
  const std::vector<std::pair<int64_t, int64_t>> in_out = {
      {4096, 4096},  {4096, 1024},  {4096, 1024}, {4096, 4096},
      {4096, 14336}, {4096, 14336}, {14336, 4096}};
  std::vector<torch::Tensor> params;
  torch::manual_seed(0);
  for (const auto& [in, out] : in_out) {
    params.push_back(torch::randn({16, in}) * 0.01);
    params.push_back(torch::randn({out, 16}) * 0.01);
  }
  return params;
}

int64_t StateBytesAfterOneStep(OptimizerKind kind) {
  auto params = LoraShapedParams();
  for (auto& p : params) p.mutable_grad() = torch::randn_like(p) * 1e-3;
  auto optimizer = MakeOptimizer(kind, params);
  EXPECT_TRUE(optimizer.ok()) << optimizer.status();
  if (!optimizer.ok()) return 0;
  EXPECT_TRUE((*optimizer)->Step(1e-4).ok());
  int64_t saved = 0;
  for (const auto& [name, t] : (*optimizer)->SaveState()) saved += t.numel() * t.element_size();
  EXPECT_LE((*optimizer)->StateBytes(), saved + 4096) << "StateBytes() undercounts the state";
  return (*optimizer)->StateBytes();
}

TEST(OptimizerTest, EightBitAdamWStateIsAtMost26PercentOfFp32) {
  const int64_t fp32 = StateBytesAfterOneStep(OptimizerKind::kAdamW);
  const int64_t int8 = StateBytesAfterOneStep(OptimizerKind::kAdamW8bit);
  ASSERT_GT(fp32, 0);
  EXPECT_LE(static_cast<double>(int8), 0.26 * static_cast<double>(fp32))
      << int8 << " bytes vs " << fp32;
}

}  // namespace
}  // namespace lorad::engine
