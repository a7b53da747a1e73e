// CheckpointedCall: gradient checkpointing for one piece of a training forward (a decoder layer).
// It runs `fn(x)` without recording autograd, keeping only `x`; backward runs `fn` again on `x`
// with autograd on and back-propagates through that recomputation, so the piece's activations
// exist only while its backward runs (PyTorch's reentrant torch.utils.checkpoint).
//
// Gradients reach every leaf tensor `fn` uses (the LoRA weights) through the recomputation; the
// result's gradient with respect to `x` flows on. The random state (CPU and the current CUDA
// device) is replayed for the recomputation, so LoRA dropout draws the same mask twice.
// `x` must require grad (make the first piece's input require it), or no backward happens.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <vector>

namespace lorad::engine {

using CheckpointedFn = std::function<torch::Tensor(const torch::Tensor&)>;

// `fn` is copied and kept until backward; what it captures must stay valid until then. With
// `offload`, a CUDA `x` waits for backward in pinned host memory instead of on the device
// (Unsloth's "unsloth" checkpointing): the device holds no piece's input between forward and
// backward. The copies run on a side stream, overlapping the compute: out as soon as `x` is
// computed, and back while the backward of the piece checkpointed after it (on this thread) runs.
// A CPU `x` is kept as it is.
//
// With `park`, the piece may keep values its recompute would compute again (ParkForRecompute),
// offloaded with its input when it offloads: memory (or copy bandwidth) for compute.
torch::Tensor CheckpointedCall(CheckpointedFn fn, const torch::Tensor& x, bool offload = false,
                               bool park = false);

// Inside the `fn` of a piece called with `park`: in its forward, ParkForRecompute keeps `values`
// (on the host when the piece offloads, else where they are) and returns true; in its recompute,
// TakeParked returns them, in order and on their device (the copies back were started two pieces'
// backward earlier). Elsewhere ParkForRecompute returns false and TakeParked nothing. The recompute
// makes the same autograd graph without computing the values: WithParkedValue gives a graph
// tensor (one whose value was not computed) the parked value, passing its gradient through.
bool ParkForRecompute(const std::vector<torch::Tensor>& values);
// A piece has one consumer of its parked values: one TakeParked call takes them all.
std::vector<torch::Tensor> TakeParked();
torch::Tensor WithParkedValue(const torch::Tensor& graph, const torch::Tensor& value);
// How many parked values recomputes have taken so far in this process (tests, diagnostics).
int64_t ParkedValuesTaken();

// At most this many bytes of a thread's offloaded tensors, beside the one offloaded last, wait on
// the device for their copy out to the host; past it the host waits for the oldest copies.
constexpr int64_t kMaxPendingCopyOutBytes = int64_t{512} << 20;

// Offloaded pieces link each to the one offloaded before it on this thread, whose input it
// prefetches as its own backward starts. A training forward that offloads starts its own chain
// (so no piece links to another forward's), and may pass a tensor computed after its last piece
// through PrefetchLastOffloadedInBackward: the identity, whose backward (which runs before that
// piece's) starts the last piece's copy back early.
void StartOffloadChain();
torch::Tensor PrefetchLastOffloadedInBackward(const torch::Tensor& x);

// Gives the pinned host memory torch's host allocator keeps cached for reuse (the offloaded
// inputs', once freed) back to the system: after an offloading job ends. Blocks in use stay.
void ReleaseCachedPinnedMemory();

// True on this thread while a checkpointed piece recomputes its forward for backward. The
// piece's backward follows at once, so an op may keep more for it (the NF4 base projections keep
// their dequantized weight instead of dequantizing it again): the memory lasts one piece's
// backward, not the whole forward's.
bool InCheckpointRecompute();

}  // namespace lorad::engine
