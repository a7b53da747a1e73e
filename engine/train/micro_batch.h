// MakeBatch: a micro-batch of tokenized examples as the tensors the model's forward and the loss
// take (the trainer's steps and evaluations).
#pragma once

#include <cstdint>
#include <vector>

#include "engine/model/llama_model.h"
#include "engine/train/example_formatter.h"

namespace lorad::engine {

struct MicroBatchTensors {
  ForwardBatch batch;     // rows right-padded with token 0 (never attended nor scored)
  torch::Tensor targets;  // [B * T] int64: the label of position t + 1, kIgnoreLabel elsewhere
  int64_t input_tokens = 0;
};

// rows[indices[0]], rows[indices[1]], ... as one batch, on the CPU.
MicroBatchTensors MakeBatch(const std::vector<TokenizedExample>& rows,
                            const std::vector<int64_t>& indices);

}  // namespace lorad::engine
