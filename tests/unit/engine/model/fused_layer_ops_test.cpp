// The fused decoder-layer ops wired into LlamaModel (the GPU path of inference and training),
// checked on the CPU through the kernels' CPU references: the tiny fixture model gives the logits
// of the torch ops it replaces, for a padded prefill batch and for cached decode steps, in fp32
// and bf16; each op's backward gives the gradients torch's autograd computes for the reference
// ops; and a training step gives the loss and LoRA gradients of the torch ops.
#include "engine/model/fused_layer_ops.h"

#include <gtest/gtest.h>

#include <cstdlib>

#include "engine/lora/lora_adapter.h"
#include "engine/model/llama_model.h"
#include "engine/model/rope.h"
#include "tests/unit/engine/tiny_model.h"

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

TEST(FusedLayerOpsTest, TheModeCoversCpuTensorsOnlyInTests) {
  ModeGuard guard;
  SetFusedLayerOps(FusedLayerOps::kAlsoOnCpu);
  EXPECT_TRUE(UseFusedLayerOps(torch::ones({2, 4}).requires_grad_(true)));  // training too
  EXPECT_FALSE(UseFusedLayerOps(torch::ones({2, 4}, torch::kLong)));
  SetFusedLayerOps(FusedLayerOps::kCuda);
  EXPECT_FALSE(UseFusedLayerOps(torch::ones({2, 4})));  // CPU tensors: the default leaves them
}

// The input gradients of the fused op and of the reference ops under torch's autograd, for the
// same upstream gradient. `fused` and `reference` map the inputs to the output.
template <typename Fused, typename Reference>
void ExpectSameGradients(const std::vector<torch::Tensor>& inputs, Fused fused, Reference reference,
                         double tolerance) {
  auto grads = [&](auto op) {
    std::vector<torch::Tensor> leaves;
    for (const torch::Tensor& t : inputs) leaves.push_back(t.detach().clone().requires_grad_(true));
    const torch::Tensor out = op(leaves);
    torch::manual_seed(11);
    out.backward(torch::randn_like(out));
    std::vector<torch::Tensor> result = {out.detach().to(torch::kFloat)};
    for (const torch::Tensor& t : leaves) result.push_back(t.grad().to(torch::kFloat));
    return result;
  };
  const std::vector<torch::Tensor> want = grads(reference);
  const std::vector<torch::Tensor> got = grads(fused);
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i) {
    const double scale = want[i].abs().max().item<double>();
    EXPECT_GT(scale, 0) << (i == 0 ? "output" : "gradient of input ") << i;
    EXPECT_LE((want[i] - got[i]).abs().max().item<double>(), tolerance * scale)
        << (i == 0 ? "the output" : "the gradient of input ") << i;
  }
}

void ExpectOpGradientsEqualAutograd(torch::ScalarType dtype, double tolerance) {
  ModeGuard guard;
  SetFusedLayerOps(FusedLayerOps::kAlsoOnCpu);
  torch::manual_seed(7);
  const auto options = torch::TensorOptions().dtype(dtype);
  const torch::Tensor weight = torch::randn({64}, options);
  ExpectSameGradients(
      {torch::randn({3, 5, 64}, options)},
      [&](const std::vector<torch::Tensor>& in) { return FusedRmsNorm(in[0], weight, 1e-5); },
      [&](const std::vector<torch::Tensor>& in) {
        const torch::Tensor xf = in[0].to(torch::kFloat);
        const torch::Tensor inv = torch::rsqrt(xf.pow(2).mean(-1, true) + 1e-5);
        return weight * (xf * inv).to(dtype);
      },
      tolerance);
  RopeConfig rope;
  const auto [cos, sin] = RotaryEmbedding(rope, 16, torch::kCPU)
                              .CosSin(torch::arange(6, torch::kLong).view({2, 3}), dtype);
  ExpectSameGradients(
      {torch::randn({2, 3, 4, 16}, options)},  // [B, T, heads, head_dim]
      [&](const std::vector<torch::Tensor>& in) { return FusedRotary(in[0], cos, sin); },
      [&](const std::vector<torch::Tensor>& in) {
        return RotaryEmbedding::Apply(in[0].transpose(1, 2), cos, sin).transpose(1, 2);
      },
      tolerance);
  // The residual add and the norm: both outputs (the sum goes on as the residual stream) carry
  // gradient, which reaches both inputs.
  ExpectSameGradients(
      {torch::randn({3, 5, 64}, options), torch::randn({3, 5, 64}, options)},
      [&](const std::vector<torch::Tensor>& in) {
        const auto [sum, normed] = FusedAddRmsNorm(in[0], in[1], weight, 1e-5);
        return torch::cat({sum, normed}, -1);
      },
      [&](const std::vector<torch::Tensor>& in) {
        const torch::Tensor sum = in[0] + in[1];
        const torch::Tensor xf = sum.to(torch::kFloat);
        const torch::Tensor inv = torch::rsqrt(xf.pow(2).mean(-1, true) + 1e-5);
        return torch::cat({sum, weight * (xf * inv).to(dtype)}, -1);
      },
      tolerance);
  ExpectSameGradients(
      {torch::randn({4, 96}, options) * 3, torch::randn({4, 96}, options)},
      [&](const std::vector<torch::Tensor>& in) { return FusedSiluMul(in[0], in[1]); },
      [&](const std::vector<torch::Tensor>& in) { return torch::silu(in[0]) * in[1]; }, tolerance);
}

TEST(FusedLayerOpsTest, Fp32BackwardsEqualAutogradOfTheTorchOps) {
  ExpectOpGradientsEqualAutograd(torch::kFloat, 1e-5);
}

TEST(FusedLayerOpsTest, Bf16BackwardsEqualAutogradOfTheTorchOps) {
  // The same roundings; RMSNorm's sums in another order may move a value by a bf16 unit.
  ExpectOpGradientsEqualAutograd(torch::kBFloat16, 1.0 / 64);
}

// A checkpointed training step of the tiny model with a LoRA adapter on every projection: the
// fused ops give the loss and every LoRA gradient of the torch ops.
TEST(FusedLayerOpsTest, TrainingLossAndLoraGradientsEqualTheTorchOps) {
  ModeGuard guard;
  auto model = LlamaModel::Load(std::getenv("LORAD_TINY_MODEL"), LlamaModelOptions());
  ASSERT_TRUE(model.ok()) << model.status();
  LoraConfig config;
  config.r = 4;
  torch::manual_seed(4);
  const torch::Tensor ids = torch::randint(3, 500, {2, 12}, torch::kLong);
  auto run = [&](FusedLayerOps mode) {
    SetFusedLayerOps(mode);
    ForwardOptions options;
    options.checkpoint_layers = true;
    return test_fixtures::LossAndLoraGradients(**model, config, {ids, {}}, options);
  };
  const auto reference = run(FusedLayerOps::kOff);
  const auto fused = run(FusedLayerOps::kAlsoOnCpu);
  ASSERT_EQ(reference.size(), fused.size());
  for (size_t i = 0; i < reference.size(); ++i) {
    const double scale = reference[i].abs().max().item<double>();
    EXPECT_GT(scale, 0) << "tensor " << i;
    EXPECT_LE((reference[i] - fused[i]).abs().max().item<double>(), 1e-4 * scale) << "tensor " << i;
  }
}

}  // namespace
}  // namespace lorad::engine
