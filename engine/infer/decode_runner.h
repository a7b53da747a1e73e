// DecodeRunner: runs the inference engine's decode steps (one new token for every running
// sequence) through LlamaModel::DecodeStep on a DecodeBatch, and on CUDA replays a CUDA graph of
// that step instead of launching its ~20 kernels per layer one by one from the host: at batch 1 a
// decode step is bound by launch overhead, not by the GPU.
//
// Graphs are captured lazily, one per (batch size bucket, LoraStack): batch sizes are padded up
// to 1, 2, 4, 8, then multiples of 8 (padding rows only touch the KV cache's scratch block), and
// a new stack (another set of adapters in the batch) drops the graphs of the previous one. Each
// graph has its own memory pool (a decode step's activations: a few MiB); a step's logits stay
// valid until the next Run. A capture that
// fails turns graphs off for good and the runner continues eagerly (graph_error() says why).
//
// Owned by the GPU loop thread; not thread-safe.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/infer/decode_batch.h"
#include "engine/infer/paged_kv_cache.h"
#include "engine/lora/multi_lora_applier.h"
#include "engine/model/llama_model.h"

namespace lorad::engine {

struct DecodeRunnerOptions {
  bool cuda_graphs = true;       // on CUDA; CPU always runs eagerly
  int64_t max_graph_rows = 256;  // larger batches run eagerly
};

class DecodeRunner {
 public:
  DecodeRunner(const LlamaModel* model, PagedKvCache* cache, const DecodeRunnerOptions& options);
  ~DecodeRunner();

  // Whether the paged decode kernel serves this model on its device (CUDA: head_dim a multiple of
  // 32 up to 256, fp32 or bf16); when not, the engine runs decode steps through Forward.
  static bool Supports(const LlamaModel& model);

  // Logits [rows.size(), vocab] for one new token per row. Row b's lora_slot indexes `stack`
  // (null: no adapters; -1: the row uses none).
  absl::StatusOr<torch::Tensor> Run(const std::vector<DecodeRow>& rows,
                                    const std::shared_ptr<const LoraStack>& stack);

  // Drops the graphs captured with a stack (they keep its adapter copies alive); the base
  // model's graphs stay.
  void DropAdapterGraphs() { DropAdapterGraphsExcept(nullptr); }

  int64_t graphs_captured() const { return graphs_captured_; }
  int64_t graph_replays() const { return graph_replays_; }
  const std::string& graph_error() const { return graph_error_; }

 private:
  struct Graph;
  int64_t Bucket(int64_t rows) const;
  void DropAdapterGraphsExcept(const LoraStack* keep);
  absl::StatusOr<torch::Tensor> RunEager(const std::vector<DecodeRow>& rows,
                                         const std::shared_ptr<const LoraStack>& stack);
  absl::StatusOr<Graph*> Capture(const std::vector<DecodeRow>& rows, int64_t bucket,
                                 const std::shared_ptr<const LoraStack>& stack);

  const LlamaModel* model_;
  PagedKvCache* cache_;
  DecodeRunnerOptions options_;
  std::map<std::pair<int64_t, const LoraStack*>, std::unique_ptr<Graph>> graphs_;
  int64_t graphs_captured_ = 0;
  int64_t graph_replays_ = 0;
  std::string graph_error_;
};

}  // namespace lorad::engine
