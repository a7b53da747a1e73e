// CheckpointedCall: a checkpointed piece gives the gradients of the same piece run plainly, and
// InCheckpointRecompute says when the piece runs again for backward (and only then).
#include "engine/model/checkpointed_call.h"

#include <gtest/gtest.h>

#include <vector>

namespace lorad::engine {
namespace {

TEST(CheckpointedCallTest, GradientsEqualThePlainPieces) {
  torch::manual_seed(1);
  const torch::Tensor w = torch::randn({4, 4}).requires_grad_(true);
  auto piece = [&](const torch::Tensor& x) { return torch::tanh(torch::matmul(x, w)) * x; };
  const torch::Tensor input = torch::randn({3, 4});

  const torch::Tensor x1 = input.clone().requires_grad_(true);
  piece(piece(x1)).sum().backward();
  const torch::Tensor plain_w = w.grad().clone();
  const torch::Tensor plain_x = x1.grad().clone();
  w.mutable_grad().zero_();

  const torch::Tensor x2 = input.clone().requires_grad_(true);
  CheckpointedCall(piece, CheckpointedCall(piece, x2)).sum().backward();
  EXPECT_TRUE(torch::allclose(w.grad(), plain_w, 1e-6, 1e-7));
  EXPECT_TRUE(torch::allclose(x2.grad(), plain_x, 1e-6, 1e-7));
}

TEST(CheckpointedCallTest, InCheckpointRecomputeOnlyWhileThePieceRunsAgain) {
  const torch::Tensor w = torch::ones({2}).requires_grad_(true);
  std::vector<bool> seen;  // InCheckpointRecompute() at each run of the piece
  auto piece = [&](const torch::Tensor& x) {
    seen.push_back(InCheckpointRecompute());
    return x * w;
  };
  const torch::Tensor x = torch::ones({2}).requires_grad_(true);
  const torch::Tensor y = CheckpointedCall(piece, x);
  EXPECT_FALSE(InCheckpointRecompute());
  y.sum().backward();
  EXPECT_FALSE(InCheckpointRecompute());
  EXPECT_EQ(seen, (std::vector<bool>{false, true}));  // the forward, then the recompute
}

}  // namespace
}  // namespace lorad::engine
