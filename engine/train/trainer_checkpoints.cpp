// Trainer::Impl's checkpoints: the job's state copied to the host on the GPU loop, and a periodic
// checkpoint written from that copy by a thread of its own while the job trains on (see
// trainer_impl.h). The end's, a cancel's and a shutdown's checkpoints are written on the loop:
// what comes next (the adapter's files, the job's end, the process's exit) needs them on disk.
#include <chrono>
#include <future>
#include <memory>
#include <system_error>

#include "engine/train/trainer_impl.h"

namespace lorad::engine {
namespace {

using trainer_impl::CheckpointSnapshot;

// WriteCheckpoint, whose filesystem and libtorch exceptions become a status: on the writing
// thread one would end the process.
absl::StatusOr<std::string> WriteSnapshot(const std::string& output_dir,
                                          const CheckpointSnapshot& c, int64_t keep) {
  try {
    return WriteCheckpoint(output_dir, c.adapter, c.optimizer, c.rng, c.state, keep);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("writing the checkpoint of step ", c.state.step, ": ",
                                            e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("writing the checkpoint of step ", c.state.step, ": ", e.what()));
  }
}

std::string CheckpointOfStep(int64_t step) { return absl::StrCat("the checkpoint of step ", step); }

}  // namespace

std::shared_ptr<const CheckpointSnapshot> Trainer::Impl::Snapshot() {
  state.train_seconds = seconds_before_this_run + RunSeconds();
  // Taken while the job steps: its stream is the one installed in the default generators.
  return std::make_shared<const CheckpointSnapshot>(
      CheckpointSnapshot{adapter.HostCopy(), optimizer->SaveState(),
                         RandomState::Capture(model->options().device.is_cuda()), state});
}

absl::Status Trainer::Impl::WriteUnsavedBest() {
  if (!unsaved_best) return absl::OkStatus();
  if (auto s = unsaved_best->WritePeft(BestAdapterPath()); !s.ok()) return s;
  unsaved_best.reset();
  return absl::OkStatus();
}

absl::Status Trainer::Impl::StartCheckpoint() {
  // The one before it still being written (a disk slower than save_every steps): the job waits
  // for it, so that no more than one snapshot is held and the folders are written in order.
  if (auto s = CollectCheckpointWrite(/*wait=*/true); !s.ok()) return s;
  // That one failed for want of storage: the job holds still, and its state now is written
  // once the wait is over.
  if (pending_checkpoint) return absl::OkStatus();
  // The checkpoint's state names the best evaluation: its adapter goes to disk first, here (the
  // loop writes every best adapter, in order). Only one whose write failed is still in memory.
  if (auto s = WriteUnsavedBest(); !s.ok()) {
    pending_checkpoint = IsStorageFailure(s);
    return RetryIfNotWritten(s, CheckpointOfStep(state.step));
  }
  CheckpointWrite write;
  write.snapshot = Snapshot();
  try {
    write.path = std::async(std::launch::async,
                            [output_dir = config.output_dir, keep = config.keep_checkpoints,
                             gate = checkpoint_write_gate, snapshot = write.snapshot] {
                              if (gate) gate(snapshot->state.step);
                              return WriteSnapshot(output_dir, *snapshot, keep);
                            });
  } catch (const std::system_error&) {  // no thread to be had: written here
    return CheckpointOrWait();
  }
  checkpoint_write = std::move(write);
  return absl::OkStatus();
}

absl::Status Trainer::Impl::CollectCheckpointWrite(bool wait) {
  if (!checkpoint_write) return absl::OkStatus();
  if (!wait &&
      checkpoint_write->path.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
    return absl::OkStatus();
  }
  std::shared_ptr<const CheckpointSnapshot> snapshot;
  absl::StatusOr<std::string> path = TakeCheckpointWrite(&snapshot);
  if (path.ok()) {
    EndStorageWait(/*all=*/true);  // the next failure waits the shortest time again
    return absl::OkStatus();
  }
  // Its snapshot is dropped (hundreds of MB for a large model): the retry writes the state the
  // job holds then.
  pending_checkpoint = IsStorageFailure(path.status());
  return RetryIfNotWritten(path.status(), CheckpointOfStep(snapshot->state.step));
}

absl::StatusOr<std::string> Trainer::Impl::TakeCheckpointWrite(
    std::shared_ptr<const CheckpointSnapshot>* snapshot) {
  CheckpointWrite write = *std::move(checkpoint_write);
  checkpoint_write.reset();
  absl::StatusOr<std::string> path = write.path.get();
  if (path.ok()) {
    written = {write.snapshot->state.step, write.snapshot->state.last_eval_step, *path};
    EmitCheckpoint(write.snapshot->state.step, *path);
  }
  *snapshot = std::move(write.snapshot);
  return path;
}

void Trainer::Impl::SettleCheckpointWrite() {
  if (!checkpoint_write) return;
  std::shared_ptr<const CheckpointSnapshot> snapshot;
  absl::StatusOr<std::string> path = TakeCheckpointWrite(&snapshot);
  if (!path.ok()) {
    Warn(absl::StrCat(CheckpointOfStep(snapshot->state.step),
                      " could not be written: ", path.status().message()));
  }
}

absl::Status Trainer::Impl::CheckpointOrWait() {
  auto path = Checkpoint();
  pending_checkpoint = !path.ok();
  return RetryIfNotWritten(path.status(), CheckpointOfStep(state.step));
}

absl::StatusOr<std::string> Trainer::Impl::Checkpoint() {
  // The one in flight first: folders are written one at a time, in order. Its failure is
  // superseded by this one (which says why if it fails too).
  if (checkpoint_write) {
    std::shared_ptr<const CheckpointSnapshot> snapshot;
    (void)TakeCheckpointWrite(&snapshot);
  }
  // Of this very state, written already (a shutdown right after the cadence's; a shutdown's
  // during the last evaluation, then its cancel's).
  if (!unsaved_best && written.step == state.step &&
      written.last_eval_step == state.last_eval_step) {
    return written.path;
  }
  if (auto s = WriteUnsavedBest(); !s.ok()) return s;
  auto path = WriteSnapshot(config.output_dir, *Snapshot(), config.keep_checkpoints);
  if (!path.ok()) return path.status();
  written = {state.step, state.last_eval_step, *path};
  EmitCheckpoint(state.step, *path);
  return path;
}

}  // namespace lorad::engine
