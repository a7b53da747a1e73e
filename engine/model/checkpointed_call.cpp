#include "engine/model/checkpointed_call.h"

#include <ATen/core/ivalue.h>
#include <torch/custom_class.h>

#include <memory>
#include <mutex>
#include <optional>

#include "engine/runtime/random_state.h"

#if defined(LORAD_WITH_CUDA)
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

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

// dst.copy_(src) on the copy stream, after the work queued so far on the compute stream.
void CopyOnSideStream(torch::Tensor& dst, const torch::Tensor& src,
                      const c10::cuda::CUDAStream& copy) {
  at::cuda::CUDAEvent queued;
  queued.record(c10::cuda::getCurrentCUDAStream(copy.device_index()));
  queued.block(copy);
  const c10::cuda::CUDAStreamGuard guard(copy);
  dst.copy_(src, /*non_blocking=*/true);
}

// A checkpointed piece's CUDA input parked in pinned host memory until its backward. The copy
// out starts after the work queued so far on the compute stream and runs on the copy stream; the
// input's device memory is not handed out again before that copy has read it. Prefetch starts the
// copy back (the piece before this one starts its own as this one's backward begins, so it
// arrives while this backward computes); Take makes the compute stream wait for it.
class OffloadedInput {
 public:
  explicit OffloadedInput(const torch::Tensor& x) : device_index_(x.device().index()) {
    const c10::cuda::CUDAStream copy = CopyStream(device_index_);
    host_ = torch::empty(x.sizes(), x.options().device(torch::kCPU).pinned_memory(true));
    CopyOnSideStream(host_, x.detach(), copy);
    c10::cuda::CUDACachingAllocator::recordStream(x.storage().data_ptr(), copy);
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

// The input offloaded last on this thread: the next piece to offload links to it (its backward
// runs just before this one's and prefetches it).
thread_local std::weak_ptr<OffloadedInput> last_offloaded;
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
#if defined(LORAD_WITH_CUDA)
  std::shared_ptr<OffloadedInput> offloaded;  // the input, when offloading
  std::weak_ptr<OffloadedInput> previous;     // the piece offloaded before this one
#endif
};

class CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               CheckpointedFn fn, bool offload) {
    auto saved = c10::make_intrusive<Saved>();
    saved->rng = RandomState::Capture(x.is_cuda());
    saved->fn = std::move(fn);
#if defined(LORAD_WITH_CUDA)
    if (offload && x.is_cuda()) {
      saved->offloaded = std::make_shared<OffloadedInput>(x);
      saved->previous = last_offloaded;
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
      x = saved->offloaded->Take();
      saved->offloaded.reset();
      // The piece before this one is the next backward: its input comes back while this runs.
      if (const std::shared_ptr<OffloadedInput> previous = saved->previous.lock()) {
        previous->Prefetch();
      }
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
      y = saved->fn(x);
    }
    now.Restore();
    torch::autograd::backward({y}, {grads[0]});
    return {x.grad(), torch::Tensor(), torch::Tensor()};
  }
};

#if defined(LORAD_WITH_CUDA)
struct LastOffloaded : torch::CustomClassHolder {
  std::weak_ptr<OffloadedInput> input;
};

class PrefetchOnBackward : public torch::autograd::Function<PrefetchOnBackward> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x) {
    auto last = c10::make_intrusive<LastOffloaded>();
    last->input = last_offloaded;
    ctx->saved_data["last"] = c10::IValue::make_capsule(std::move(last));
    return x.view_as(x);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto last =
        c10::static_intrusive_pointer_cast<LastOffloaded>(ctx->saved_data["last"].toCapsule());
    if (const std::shared_ptr<OffloadedInput> input = last->input.lock()) input->Prefetch();
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

torch::Tensor CheckpointedCall(CheckpointedFn fn, const torch::Tensor& x, bool offload) {
  return CheckpointFunction::apply(x, std::move(fn), offload);
}

}  // namespace lorad::engine
