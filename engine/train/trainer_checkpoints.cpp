// Trainer::Impl's checkpoints: the job's state copied to the host on the GPU loop, and a periodic
// checkpoint (and the end's) written from that copy by a thread of its own while the job trains
// on, or its end waits, and the loop serves (see trainer_impl.h). A cancel's and a shutdown's
// checkpoints are written on the loop: the job's end, the process's exit, need them on disk.
#include <chrono>
#include <future>
#include <memory>
#include <system_error>

#include "engine/train/trainer_impl.h"

namespace lorad::engine {
namespace {

using trainer_impl::CheckpointSnapshot;

// WriteCheckpoint (after the best evaluation's adapter it names, if that is not on disk yet),
// whose filesystem and libtorch exceptions become a status: on the writing thread one would end
// the process.
absl::StatusOr<std::string> WriteSnapshot(const std::string& output_dir,
                                          const CheckpointSnapshot& c, int64_t keep,
                                          const LoraAdapter* best = nullptr,
                                          const std::string& best_path = "") {
  try {
    if (best != nullptr) {
      if (auto s = best->WritePeft(best_path); !s.ok()) return s;
    }
    return WriteCheckpoint(output_dir, c.adapter, c.optimizer, c.rng, c.state, keep);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("writing the checkpoint of step ", c.state.step, ": ",
                                            e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("writing the checkpoint of step ", c.state.step, ": ", e.what()));
  }
}

// How often the loop looks again at a job whose end waits for a write (Trainer::idle_until).
constexpr auto kWriteLookAgain = std::chrono::milliseconds(5);

template <typename T>
bool InFlight(const std::future<T>& f) {
  return f.valid() && f.wait_for(std::chrono::seconds(0)) != std::future_status::ready;
}

}  // namespace

std::string Trainer::Impl::CheckpointName(int64_t step) const {
  if (finishing && finishing->stage == Finishing::Stage::kLastCheckpoint && step == state.step) {
    return absl::StrCat("the last checkpoint (step ", step, ")");
  }
  return absl::StrCat("the checkpoint of step ", step);
}

bool Trainer::Impl::WaitsForItsWrite() const {
  if (!finishing) return false;
  if (finishing->stage == Finishing::Stage::kLastCheckpoint && checkpoint_write &&
      InFlight(checkpoint_write->path)) {
    return true;
  }
  return InFlight(finishing->adapter_write);
}

std::optional<trainer_impl::Clock::time_point> Trainer::Impl::IdleUntil() const {
  if (cancel.load()) return std::nullopt;  // the next Step() ends it
  if (storage_wait) return storage_wait->retry_at;
  if (WaitsForItsWrite()) return trainer_impl::Clock::now() + kWriteLookAgain;
  return std::nullopt;
}

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
  CheckpointWrite write;
  write.snapshot = Snapshot();
  // The checkpoint's state names the best evaluation: its adapter goes to disk first, on the
  // same thread (one write at a time: the best adapters reach the disk in order).
  if (unsaved_best) {
    write.best = std::make_shared<const LoraAdapter>(*std::move(unsaved_best));
    unsaved_best.reset();
  }
  try {
    write.path = std::async(
        std::launch::async, [output_dir = config.output_dir, keep = config.keep_checkpoints,
                             gate = checkpoint_write_gate, snapshot = write.snapshot,
                             best = write.best, best_path = BestAdapterPath()] {
          if (gate) gate(snapshot->state.step);
          return WriteSnapshot(output_dir, *snapshot, keep, best.get(), best_path);
        });
  } catch (const std::system_error&) {  // no thread to be had: written here
    if (write.best) unsaved_best = *write.best;
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
  return RetryIfNotWritten(path.status(), CheckpointName(snapshot->state.step));
}

absl::StatusOr<std::string> Trainer::Impl::TakeCheckpointWrite(
    std::shared_ptr<const CheckpointSnapshot>* snapshot) {
  CheckpointWrite write = *std::move(checkpoint_write);
  checkpoint_write.reset();
  absl::StatusOr<std::string> path = write.path.get();
  if (path.ok()) {
    written = {write.snapshot->state.step, write.snapshot->state.last_eval_step, *path};
    EmitCheckpoint(write.snapshot->state.step, *path);
  } else if (write.best && !unsaved_best) {
    unsaved_best = *write.best;  // written again with the next checkpoint (unless a newer best)
  }
  *snapshot = std::move(write.snapshot);
  return path;
}

void Trainer::Impl::SettleCheckpointWrite() {
  if (!checkpoint_write) return;
  std::shared_ptr<const CheckpointSnapshot> snapshot;
  absl::StatusOr<std::string> path = TakeCheckpointWrite(&snapshot);
  if (!path.ok()) {
    Warn(absl::StrCat(CheckpointName(snapshot->state.step),
                      " could not be written: ", path.status().message()));
  }
}

absl::Status Trainer::Impl::CheckpointOrWait() {
  auto path = Checkpoint();
  pending_checkpoint = !path.ok();
  return RetryIfNotWritten(path.status(), CheckpointName(state.step));
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
  if (StateWritten()) return written.path;
  if (auto s = WriteUnsavedBest(); !s.ok()) return s;
  auto path = WriteSnapshot(config.output_dir, *Snapshot(), config.keep_checkpoints);
  if (!path.ok()) return path.status();
  written = {state.step, state.last_eval_step, *path};
  EmitCheckpoint(state.step, *path);
  return path;
}

}  // namespace lorad::engine
