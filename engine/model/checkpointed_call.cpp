#include "engine/model/checkpointed_call.h"

#include <ATen/core/ivalue.h>
#include <torch/custom_class.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "engine/runtime/random_state.h"

#if defined(LORAD_WITH_CUDA)
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <deque>
#include <map>
#endif

namespace lorad::engine {
namespace {

#if defined(LORAD_WITH_CUDA)
// The side stream that carries a device's offloaded layer inputs to the host and back, so the
// copies overlap the layers' compute instead of standing in its stream (a copy each way of every
// checkpointed piece's input: on the compute stream they cost more than the memory was worth).
c10::cuda::CUDAStream CopyStream(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, cudaStream_t> streams;
  const std::lock_guard<std::mutex> lock(mutex);
  cudaStream_t& stream = streams[device];
  if (stream == nullptr) {
    const c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  return c10::cuda::getStreamFromExternal(stream, device);
}

// kMaxPendingCopyOutBytes: the caching allocator hands a tensor's device memory out again only
// once the copy that reads it has ended, so without a bound a forward that offloads faster than
// the link carries (parked MLP values: 235 MB a layer at Llama-3-8B, 2 x 2048 tokens) would hold
// gigabytes of waiting tensors beyond what it has allocated (and what its peak counts).
//
// The copies out still in flight on this thread, oldest first, with their bytes.
struct PendingCopyOut {
  std::shared_ptr<at::cuda::CUDAEvent> done;
  int64_t bytes;
};
thread_local std::deque<PendingCopyOut> pending_copies_out;
thread_local int64_t pending_copy_out_bytes = 0;

// Counts a copy out just queued on `copy`, then waits until at most kMaxPendingCopyOutBytes are
// in flight (forgetting the copies that ended on the way), but never for that copy itself: one
// tensor above the bound would make the host wait for all the queued compute before it.
void BoundPendingCopiesOut(int64_t bytes, const c10::cuda::CUDAStream& copy) {
  auto done = std::make_shared<at::cuda::CUDAEvent>();
  done->record(copy);
  pending_copies_out.push_back({std::move(done), bytes});
  pending_copy_out_bytes += bytes;
  while (pending_copies_out.size() > 1) {
    PendingCopyOut& oldest = pending_copies_out.front();
    if (pending_copy_out_bytes > kMaxPendingCopyOutBytes) {
      oldest.done->synchronize();
    } else if (!oldest.done->query()) {
      break;
    }
    pending_copy_out_bytes -= oldest.bytes;
    pending_copies_out.pop_front();
  }
}

// dst.copy_(src) on the copy stream, after the work queued so far on the compute stream.
void CopyOnSideStream(torch::Tensor& dst, const torch::Tensor& src,
                      const c10::cuda::CUDAStream& copy) {
  at::cuda::CUDAEvent queued;
  queued.record(c10::cuda::getCurrentCUDAStream(copy.device_index()));
  queued.block(copy);
  const c10::cuda::CUDAStreamGuard guard(copy);
  dst.copy_(src, /*non_blocking=*/true);
}

// A CUDA tensor a checkpointed piece keeps for its backward (its input, or a value it parked),
// waiting in pinned host memory. The copy out starts after the work queued so far on the compute
// stream and runs on the copy stream; the tensor's device memory is not handed out again before
// that copy has read it. Prefetch starts the copy back; Take makes the compute stream wait for it.
class OffloadedTensor {
 public:
  explicit OffloadedTensor(const torch::Tensor& x) : device_index_(x.device().index()) {
    const c10::cuda::CUDAStream copy = CopyStream(device_index_);
    host_ = torch::empty(x.sizes(), x.options().device(torch::kCPU).pinned_memory(true));
    CopyOnSideStream(host_, x.detach(), copy);
    c10::cuda::CUDACachingAllocator::recordStream(x.storage().data_ptr(), copy);
    BoundPendingCopiesOut(static_cast<int64_t>(x.nbytes()), copy);
  }

  void Prefetch() {
    if (device_.defined() || !host_.defined()) return;
    const c10::cuda::CUDAStream copy = CopyStream(device_index_);
    // Allocated in the compute stream's order: the copy waits until that memory is free there.
    device_ = torch::empty(
        host_.sizes(),
        torch::TensorOptions().dtype(host_.dtype()).device(torch::kCUDA, device_index_));
    CopyOnSideStream(device_, host_, copy);
    copied_back_.record(copy);
    // Freed unread (a backward that failed), the memory still waits for the copy.
    c10::cuda::CUDACachingAllocator::recordStream(device_.storage().data_ptr(), copy);
  }

  torch::Tensor Take() {
    Prefetch();
    copied_back_.block(c10::cuda::getCurrentCUDAStream(device_index_));
    host_ = torch::Tensor();  // the host allocator keeps it until the copy back has read it
    return std::move(device_);
  }

 private:
  c10::DeviceIndex device_index_;
  torch::Tensor host_;
  torch::Tensor device_;  // the copy back, once started
  at::cuda::CUDAEvent copied_back_;
};

// What an offloading piece keeps on the host: its input and the values it parked. Pieces link
// each to the one offloaded before it (on this thread), whose backward follows theirs: as piece
// P's backward starts it prefetches P - 1's input (33 MB a piece at Llama-3-8B, 2 x 2048 tokens)
// and P - 2's parked values (235 MB for an MLP's gate and up: one piece's backward is too short
// to bring them, two are not), so both arrive while the backward computes.
struct OffloadedPiece {
  std::shared_ptr<OffloadedTensor> input;
  std::vector<std::shared_ptr<OffloadedTensor>> parked;
  std::weak_ptr<OffloadedPiece> previous;

  void PrefetchParked() {
    for (const auto& value : parked) value->Prefetch();
  }
  // The prefetches due as the backward of the piece after this one starts.
  void PrefetchAsNext() {
    input->Prefetch();
    PrefetchParked();  // already started one piece earlier, unless this is the first
    if (const std::shared_ptr<OffloadedPiece> before = previous.lock()) before->PrefetchParked();
  }
};

// The piece offloaded last on this thread: the next piece to offload links to it.
thread_local std::weak_ptr<OffloadedPiece> last_offloaded;
#endif

thread_local int recomputing = 0;  // CheckpointFunction::backward calls in their recompute

// Marks this thread as recomputing while it lives (InCheckpointRecompute).
struct RecomputeScope {
  RecomputeScope() { ++recomputing; }
  ~RecomputeScope() { --recomputing; }
  RecomputeScope(const RecomputeScope&) = delete;
  RecomputeScope& operator=(const RecomputeScope&) = delete;
};

// What backward needs, kept alive by the autograd node (a capsule in saved_data).
struct Saved : torch::CustomClassHolder {
  CheckpointedFn fn;
  RandomState rng;
  bool park = false;                  // the piece may park values for its recompute
  std::vector<torch::Tensor> parked;  // those parked where they are (not offloading)
#if defined(LORAD_WITH_CUDA)
  std::shared_ptr<OffloadedPiece> offloaded;  // input and parked values, when offloading
#endif
};

// The piece whose function runs on this thread (forward or recompute): ParkForRecompute and
// TakeParked talk to it.
thread_local Saved* running_piece = nullptr;

// Sets running_piece while it lives.
struct RunningPieceScope {
  explicit RunningPieceScope(Saved* piece) : outer(running_piece) { running_piece = piece; }
  ~RunningPieceScope() { running_piece = outer; }
  RunningPieceScope(const RunningPieceScope&) = delete;
  RunningPieceScope& operator=(const RunningPieceScope&) = delete;
  Saved* outer;
};

class CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               CheckpointedFn fn, bool offload, bool park) {
    auto saved = c10::make_intrusive<Saved>();
    saved->rng = RandomState::Capture(x.is_cuda());
    saved->fn = std::move(fn);
    saved->park = park;
#if defined(LORAD_WITH_CUDA)
    if (offload && x.is_cuda()) {
      saved->offloaded = std::make_shared<OffloadedPiece>();
      saved->offloaded->input = std::make_shared<OffloadedTensor>(x);
      saved->offloaded->previous = last_offloaded;
      last_offloaded = saved->offloaded;
      ctx->save_for_backward({});
    } else {
      ctx->save_for_backward({x});
    }
#else
    (void)offload;
    ctx->save_for_backward({x});
#endif
    torch::Tensor y;
    {
      torch::NoGradGuard no_grad;
      const RunningPieceScope running(saved.get());
      y = saved->fn(x);
    }
    ctx->saved_data["saved"] = c10::IValue::make_capsule(std::move(saved));
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved =
        c10::static_intrusive_pointer_cast<Saved>(ctx->saved_data["saved"].toCapsule());
    torch::Tensor x;
#if defined(LORAD_WITH_CUDA)
    if (saved->offloaded != nullptr) {
      x = saved->offloaded->input->Take();
      for (const auto& value : saved->offloaded->parked) saved->parked.push_back(value->Take());
      // The pieces before this one are the next backwards: their tensors come back while this
      // one runs.
      if (const std::shared_ptr<OffloadedPiece> previous = saved->offloaded->previous.lock()) {
        previous->PrefetchAsNext();
      }
      saved->offloaded.reset();
    }
#endif
    if (!x.defined()) {
      const torch::autograd::variable_list kept = ctx->get_saved_variables();
      TORCH_CHECK(!kept.empty(),
                  "a checkpointed piece whose input was offloaded runs backward once "
                  "(retain_graph is not supported)");
      x = kept[0].detach();
    }
    x.requires_grad_(true);
    // Replay the forward's random draws, then put the generators back where backward found them.
    const RandomState now = RandomState::Capture(x.is_cuda());
    saved->rng.Restore();
    torch::Tensor y;
    {
      torch::AutoGradMode grad(true);
      const RecomputeScope recompute;
      const RunningPieceScope running(saved.get());
      y = saved->fn(x);
    }
    now.Restore();
    saved->parked.clear();  // a value the recompute did not take
    torch::autograd::backward({y}, {grads[0]});
    return {x.grad(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

#if defined(LORAD_WITH_CUDA)
struct LastOffloaded : torch::CustomClassHolder {
  std::weak_ptr<OffloadedPiece> piece;
};

class PrefetchOnBackward : public torch::autograd::Function<PrefetchOnBackward> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x) {
    auto last = c10::make_intrusive<LastOffloaded>();
    last->piece = last_offloaded;
    ctx->saved_data["last"] = c10::IValue::make_capsule(std::move(last));
    return x.view_as(x);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto last =
        c10::static_intrusive_pointer_cast<LastOffloaded>(ctx->saved_data["last"].toCapsule());
    if (const std::shared_ptr<OffloadedPiece> piece = last->piece.lock()) piece->PrefetchAsNext();
    return {grads[0]};
  }
};
#endif

}  // namespace

bool InCheckpointRecompute() { return recomputing > 0; }

void StartOffloadChain() {
#if defined(LORAD_WITH_CUDA)
  last_offloaded.reset();
#endif
}

void ReleaseCachedPinnedMemory() {
#if defined(LORAD_WITH_CUDA)
  try {
    at::getHostAllocator(at::kCUDA)->empty_cache();
  } catch (const c10::Error&) {
    // No CUDA host allocator in this process (a CPU-only torch): nothing was cached.
  }
#endif
}

torch::Tensor PrefetchLastOffloadedInBackward(const torch::Tensor& x) {
#if defined(LORAD_WITH_CUDA)
  if (last_offloaded.expired() || !torch::GradMode::is_enabled() || !x.requires_grad()) return x;
  return PrefetchOnBackward::apply(x);
#else
  return x;
#endif
}

torch::Tensor CheckpointedCall(CheckpointedFn fn, const torch::Tensor& x, bool offload, bool park) {
  return CheckpointFunction::apply(x, std::move(fn), offload, park);
}

bool ParkForRecompute(const std::vector<torch::Tensor>& values) {
  Saved* piece = running_piece;
  if (piece == nullptr || !piece->park || InCheckpointRecompute()) return false;
#if defined(LORAD_WITH_CUDA)
  if (piece->offloaded != nullptr) {
    for (const torch::Tensor& v : values) {
      TORCH_CHECK(v.is_cuda(), "ParkForRecompute: an offloading piece parks CUDA tensors");
      piece->offloaded->parked.push_back(std::make_shared<OffloadedTensor>(v));
    }
    return true;
  }
#endif
  for (const torch::Tensor& v : values) piece->parked.push_back(v.detach());
  return true;
}

// Process-wide: a CUDA backward (and so the recompute) runs on autograd's device thread.
std::atomic<int64_t> parked_values_taken{0};

std::vector<torch::Tensor> TakeParked() {
  Saved* piece = running_piece;
  if (piece == nullptr || !InCheckpointRecompute()) return {};
  parked_values_taken += static_cast<int64_t>(piece->parked.size());
  return std::exchange(piece->parked, {});
}

int64_t ParkedValuesTaken() { return parked_values_taken; }

namespace {

// value's data, with graph's place in autograd: the gradient passes to graph unchanged.
class WithValueFunction : public torch::autograd::Function<WithValueFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext*, const torch::Tensor& graph,
                               const torch::Tensor& value) {
    TORCH_CHECK(graph.sizes() == value.sizes(), "WithParkedValue: the graph's tensor is [",
                graph.sizes(), "], the parked value [", value.sizes(), "]");
    return value.view_as(value);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    return {grads[0], torch::Tensor()};
  }
};

}  // namespace

torch::Tensor WithParkedValue(const torch::Tensor& graph, const torch::Tensor& value) {
  return WithValueFunction::apply(graph, value.detach());
}

}  // namespace lorad::engine
