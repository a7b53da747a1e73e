// The fused decoder-layer ops wired into LlamaModel (the GPU inference path), checked on the CPU
// through the kernels' CPU references: the tiny fixture model gives the logits of the torch ops it
// replaces, for a padded prefill batch and for cached decode steps, in fp32 and bf16.
#include "engine/model/fused_layer_ops.h"

#include <gtest/gtest.h>

#include <cstdlib>

#include "engine/model/llama_model.h"

namespace lorad::engine {
namespace {

// Restores the default mode when a test ends.
struct ModeGuard {
  ~ModeGuard() { SetFusedLayerOps(FusedLayerOps::kCuda); }
};

torch::Tensor Logits(const LlamaModel& model, const torch::Tensor& ids,
                     const std::vector<int64_t>& lengths) {
  auto cache = model.NewCache(ids.size(0), 64);
  EXPECT_TRUE(cache.ok());
  auto prefill = model.Forward({ids, lengths}, cache->get(), ForwardOptions());
  EXPECT_TRUE(prefill.ok()) << prefill.status();
  // Three decode steps on top of the cache.
  std::vector<torch::Tensor> out = {*prefill};
  for (int step = 0; step < 3; ++step) {
    const torch::Tensor next = torch::full({ids.size(0), 1}, 7 + step, torch::kLong);
    auto logits = model.Forward({next, {}}, cache->get(), ForwardOptions());
    EXPECT_TRUE(logits.ok()) << logits.status();
    out.push_back(*logits);
  }
  return torch::cat(out, 1).to(torch::kFloat);
}

void ExpectFusedEqualsTorch(torch::ScalarType dtype, double tolerance) {
  ModeGuard guard;
  LlamaModelOptions options;
  options.dtype = dtype;
  auto model = LlamaModel::Load(std::getenv("LORAD_TINY_MODEL"), options);
  ASSERT_TRUE(model.ok()) << model.status();
  torch::manual_seed(3);
  const torch::Tensor ids = torch::randint(3, 500, {3, 9}, torch::kLong);
  const std::vector<int64_t> lengths = {9, 4, 6};
  SetFusedLayerOps(FusedLayerOps::kOff);
  const torch::Tensor reference = Logits(**model, ids, lengths);
  SetFusedLayerOps(FusedLayerOps::kAlsoOnCpu);
  ASSERT_TRUE(UseFusedLayerOps(torch::zeros({1}, dtype)));
  const torch::Tensor fused = Logits(**model, ids, lengths);
  // Compare the valid positions only (padding rows hold arbitrary values on both sides).
  for (int64_t b = 0; b < 3; ++b) {
    const int64_t n = lengths[b];
    const torch::Tensor r =
        torch::cat({reference[b].narrow(0, 0, n), reference[b].narrow(0, 9, 3)});
    const torch::Tensor f = torch::cat({fused[b].narrow(0, 0, n), fused[b].narrow(0, 9, 3)});
    EXPECT_LE((r - f).abs().max().item<double>(), tolerance * r.abs().max().item<double>())
        << "row " << b;
  }
}

TEST(FusedLayerOpsTest, Fp32LogitsEqualTheTorchOps) { ExpectFusedEqualsTorch(torch::kFloat, 1e-5); }

TEST(FusedLayerOpsTest, Bf16LogitsEqualTheTorchOps) {
  ExpectFusedEqualsTorch(torch::kBFloat16, 1e-6);  // bit-identical on CPU today
}

TEST(FusedLayerOpsTest, AutogradAndTrainingKeepTheTorchOps) {
  ModeGuard guard;
  SetFusedLayerOps(FusedLayerOps::kAlsoOnCpu);
  const torch::Tensor x = torch::ones({2, 4}).requires_grad_(true);
  EXPECT_FALSE(UseFusedLayerOps(x));
  {
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(UseFusedLayerOps(x));
  }
  {
    torch::NoGradGuard no_grad;
    const ScopedTorchLayerOps training;
    EXPECT_FALSE(UseFusedLayerOps(x));  // a training forward's no-grad part (checkpointing)
  }
  SetFusedLayerOps(FusedLayerOps::kCuda);
  EXPECT_FALSE(UseFusedLayerOps(torch::ones({2, 4})));  // CPU tensors: the default leaves them
}

}  // namespace
}  // namespace lorad::engine
