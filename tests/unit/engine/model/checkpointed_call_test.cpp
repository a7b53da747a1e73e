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

// A piece called with `park` keeps the value it parks in its forward; its recompute takes it
// instead of computing it again (the expensive part runs once), builds the same graph with
// WithParkedValue, and gives the gradients of a piece that recomputes everything. Without `park`
// nothing is kept and the recompute computes it.
TEST(CheckpointedCallTest, ParkedValuesReplaceTheirRecompute) {
  torch::manual_seed(2);
  const torch::Tensor w = torch::randn({4, 4}).requires_grad_(true);
  const torch::Tensor input = torch::randn({3, 4});
  int products = 0;  // matmuls computed for their value
  std::vector<size_t> taken;
  auto piece = [&](const torch::Tensor& x) {
    const std::vector<torch::Tensor> parked = TakeParked();
    taken.push_back(parked.size());
    torch::Tensor h;
    if (parked.empty()) {
      ++products;
      h = torch::matmul(x, w);
      ParkForRecompute({h});
    } else {
      // The graph of matmul(x, w) (its value discarded: the model's pieces use a graph-only
      // product here), given the parked value.
      h = WithParkedValue(torch::matmul(x, w), parked[0]);
    }
    return torch::tanh(h) * x;
  };
  auto gradients = [&](bool park) {
    w.mutable_grad() = torch::Tensor();
    const torch::Tensor x = input.clone().requires_grad_(true);
    CheckpointedCall(piece, x, /*offload=*/false, park).sum().backward();
    return std::vector<torch::Tensor>{w.grad().clone(), x.grad().clone()};
  };
  const auto recomputed = gradients(false);
  EXPECT_EQ(products, 2);
  EXPECT_EQ(taken, (std::vector<size_t>{0, 0}));
  products = 0;
  taken.clear();
  const auto parked = gradients(true);
  EXPECT_EQ(products, 1);  // the forward's only
  EXPECT_EQ(taken, (std::vector<size_t>{0, 1}));
  for (size_t i = 0; i < parked.size(); ++i) {
    EXPECT_TRUE(torch::allclose(parked[i], recomputed[i], 1e-6, 1e-7)) << "gradient " << i;
  }
  // Outside a checkpointed piece nothing parks.
  EXPECT_FALSE(ParkForRecompute({input}));
  EXPECT_TRUE(TakeParked().empty());
}

}  // namespace
}  // namespace lorad::engine
