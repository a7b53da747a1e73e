#include "engine/train/chunked_cross_entropy.h"

#include <gtest/gtest.h>

namespace lorad::engine {
namespace {

// The chunked loss and its gradient equal torch's cross entropy over full logits, whatever the
// chunk size, with ignored positions skipped.
TEST(ChunkedCrossEntropy, EqualsFullCrossEntropyAndGradient) {
  torch::manual_seed(0);
  const torch::Tensor w = torch::randn({50, 16});
  const torch::Tensor targets = torch::tensor({3, -100, 7, 49, 0, -100, 12, 5, 9}, torch::kLong);
  const torch::Tensor h0 = torch::randn({9, 16});

  torch::Tensor h_ref = h0.clone().requires_grad_(true);
  torch::Tensor ref = torch::nn::functional::cross_entropy(
      torch::linear(h_ref, w), targets,
      torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
  ref.backward();

  for (int64_t chunk : {1, 2, 4, 9, 100}) {
    torch::Tensor h = h0.clone().requires_grad_(true);
    torch::Tensor loss = ChunkedCrossEntropySum(h, w, targets, chunk);
    EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-4) << "chunk " << chunk;
    (loss * 0.5).backward();
    EXPECT_TRUE(torch::allclose(h.grad(), h_ref.grad() * 0.5, 1e-5, 1e-6)) << "chunk " << chunk;
  }
  torch::NoGradGuard no_grad;
  EXPECT_NEAR(ChunkedCrossEntropySum(h0, w, targets, 3).item<double>(), ref.item<double>(), 1e-4);
}

TEST(ChunkedCrossEntropy, AllIgnoredIsZero) {
  torch::Tensor h = torch::randn({4, 8}).requires_grad_(true);
  torch::Tensor loss =
      ChunkedCrossEntropySum(h, torch::randn({10, 8}), torch::full({4}, -100, torch::kLong), 2);
  EXPECT_EQ(loss.item<double>(), 0.0);
  loss.backward();
  EXPECT_EQ(h.grad().abs().sum().item<double>(), 0.0);
}

TEST(ChunkedCrossEntropy, TargetOutsideTheVocabularyIsAnError) {
  const torch::Tensor h = torch::randn({3, 8});
  const torch::Tensor w = torch::randn({10, 8});
  for (const int64_t bad : {int64_t{10}, int64_t{-1}}) {
    try {
      ChunkedCrossEntropySum(h, w, torch::tensor({int64_t{1}, bad, int64_t{-100}}), 2);
      ADD_FAILURE() << "target " << bad << " was accepted";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("outside the vocabulary [0, 10)"), std::string::npos)
          << e.what();
    }
  }
}

}  // namespace
}  // namespace lorad::engine
