#include "engine/infer/decode_runner.h"

#include "absl/strings/str_cat.h"

#if defined(LORAD_WITH_CUDA)
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace lorad::engine {

struct DecodeRunner::Graph {
  Graph(PagedKvCache* cache, int64_t rows, std::shared_ptr<const LoraStack> s)
      : batch(cache, rows), stack(std::move(s)) {}
  DecodeBatch batch;                       // the static inputs the graph reads
  std::shared_ptr<const LoraStack> stack;  // kept alive: the graph reads its tensors
  std::optional<MultiLoraApplier> lora;    // reads batch.lora_slots()
  torch::Tensor logits;                    // [rows, vocab], written by every replay
#if defined(LORAD_WITH_CUDA)
  at::cuda::CUDAGraph graph;
#endif
};

DecodeRunner::DecodeRunner(const LlamaModel* model, PagedKvCache* cache,
                           const DecodeRunnerOptions& options)
    : model_(model), cache_(cache), options_(options) {}

DecodeRunner::~DecodeRunner() = default;

bool DecodeRunner::Supports(const LlamaModel& model) {
  const auto dtype = model.options().dtype;
  if (dtype != torch::kFloat && dtype != torch::kBFloat16) return false;
  const int64_t d = model.config().head_dim;
  return !model.options().device.is_cuda() || (d % 32 == 0 && d <= 256);
}

int64_t DecodeRunner::Bucket(int64_t rows) const {
  if (rows <= 8) {
    int64_t b = 1;
    while (b < rows) b *= 2;
    return b;
  }
  return (rows + 7) / 8 * 8;
}

namespace {

int32_t NoneSlot(const std::shared_ptr<const LoraStack>& stack) {
  return stack != nullptr ? stack->none_slot() : -1;
}

}  // namespace

absl::StatusOr<torch::Tensor> DecodeRunner::RunEager(
    const std::vector<DecodeRow>& rows, const std::shared_ptr<const LoraStack>& stack) {
  DecodeBatch batch(cache_, static_cast<int64_t>(rows.size()));
  if (auto s = batch.Fill(rows, NoneSlot(stack)); !s.ok()) return s;
  std::optional<MultiLoraApplier> lora;
  if (stack != nullptr) lora.emplace(stack, batch.lora_slots());
  return model_->DecodeStep(batch.ids(), batch.positions(), &batch, lora ? &*lora : nullptr);
}

absl::StatusOr<DecodeRunner::Graph*> DecodeRunner::Capture(
    const std::vector<DecodeRow>& rows, int64_t bucket,
    const std::shared_ptr<const LoraStack>& stack) {
#if defined(LORAD_WITH_CUDA)
  // Another set of adapters: the graphs of the old stack would keep its copies alive.
  DropAdapterGraphsExcept(stack.get());
  auto graph = std::make_unique<Graph>(cache_, bucket, stack);
  if (auto s = graph->batch.Fill(rows, NoneSlot(stack)); !s.ok()) return s;
  if (stack != nullptr) graph->lora.emplace(stack, graph->batch.lora_slots());
  const LoraApplier* lora = graph->lora ? &*graph->lora : nullptr;
  const auto device = model_->options().device;
  // Capture on a side stream, after the work already queued; warm up once first (lazy cuBLAS
  // and allocator initialisation must not happen inside the capture). The warm-up writes this
  // step's keys and values, which the replay below writes again, identically.
  c10::cuda::device_synchronize();
  {
    c10::cuda::CUDAStreamGuard guard(c10::cuda::getStreamFromPool(false, device.index()));
    model_->DecodeStep(graph->batch.ids(), graph->batch.positions(), &graph->batch, lora);
    c10::cuda::getCurrentCUDAStream(device.index()).synchronize();
    // Thread-local: other threads (an RPC copying an adapter to the device) may use CUDA meanwhile.
    // A private memory pool per graph: a shared one is freed when its last graph goes (a stack
    // change drops graphs) and PyTorch's allocator then refuses to capture into its id again.
    graph->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    graph->logits =
        model_->DecodeStep(graph->batch.ids(), graph->batch.positions(), &graph->batch, lora);
    graph->graph.capture_end();
  }
  c10::cuda::device_synchronize();
  ++graphs_captured_;
  Graph* raw = graph.get();
  graphs_[{bucket, stack.get()}] = std::move(graph);
  return raw;
#else
  (void)rows;
  (void)bucket;
  (void)stack;
  return absl::FailedPreconditionError("this build has no CUDA graphs");
#endif
}

void DecodeRunner::DropAdapterGraphsExcept(const LoraStack* keep) {
  for (auto it = graphs_.begin(); it != graphs_.end();) {
    const LoraStack* stack = it->first.second;
    it = stack != nullptr && stack != keep ? graphs_.erase(it) : std::next(it);
  }
}

absl::StatusOr<torch::Tensor> DecodeRunner::Run(const std::vector<DecodeRow>& rows,
                                                const std::shared_ptr<const LoraStack>& stack) {
  const int64_t n = static_cast<int64_t>(rows.size());
  const bool graphs = options_.cuda_graphs && graph_error_.empty() &&
                      model_->options().device.is_cuda() && n <= options_.max_graph_rows;
  if (!graphs) return RunEager(rows, stack);
  const int64_t bucket = Bucket(n);
  auto it = graphs_.find({bucket, stack.get()});
  Graph* graph = nullptr;
  if (it == graphs_.end()) {
    try {
      auto captured = Capture(rows, bucket, stack);
      if (!captured.ok()) return captured.status();
      graph = *captured;
    } catch (const c10::Error& e) {
      graph_error_ = absl::StrCat("capturing a decode step of ", bucket,
                                  " rows in a CUDA graph failed (decoding without graphs from now "
                                  "on): ",
                                  e.what_without_backtrace());
      graphs_.clear();
      return RunEager(rows, stack);
    }
  } else {
    graph = it->second.get();
    if (auto s = graph->batch.Fill(rows, NoneSlot(stack)); !s.ok()) return s;
  }
#if defined(LORAD_WITH_CUDA)
  graph->graph.replay();
  ++graph_replays_;
#endif
  return graph->logits.narrow(0, 0, n);
}

}  // namespace lorad::engine
