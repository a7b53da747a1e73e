#include <filesystem>
#include <future>
#include <system_error>

#include "engine/train/trainer_impl.h"

namespace lorad::engine {

using trainer_impl::Clock;
using trainer_impl::kAnsweredExamples;
using trainer_impl::kAnswerTokens;
using trainer_impl::Seconds;

absl::Status Trainer::Impl::Finish(bool cancelled, bool early_stopped) {
  if (cancelled) return EmitFinished(true, early_stopped, TrainingSummary());
  if (!finishing) {
    finishing.emplace();
    finishing->early_stopped = early_stopped;
    finishing->scored_step = state.step;
  }
  return ContinueFinishing();
}

absl::Status Trainer::Impl::ContinueFinishing() {
  Finishing& f = *finishing;
  const bool validating = !data->validation().empty();
  // A stage returns after a piece of work (a validation micro-batch, a token of an answer), and
  // goes on to the next one when it has none left.
  if (f.stage == Finishing::Stage::kLastEval) {
    // The last step's evaluation counts for the best, and its event precedes the last
    // checkpoint's, as a cadence evaluation's does (and as a replayed history orders them). The
    // cadence's own is reused, not repeated.
    // Reported already when the job resumed from this step's checkpoint (written after it), not
    // when a shutdown interrupted the cadence's evaluation before it. A checkpoint of an older
    // lorad version does not say: then the cadence's was reported.
    const bool reported = state.last_eval_step >= 0
                              ? state.last_eval_step == state.step
                              : config.eval_every > 0 && state.step % config.eval_every == 0;
    if (validating && last_eval && last_eval->step == state.step) {
      f.scored = last_eval;
    } else if (validating) {
      auto complete = EvaluateSome(f.eval);
      if (!complete.ok()) return complete.status();
      if (!*complete) return absl::OkStatus();
      f.scored = EvaluationOf(f.eval);
      if (!reported) {
        if (auto st = ReportEvaluation(*f.scored); !st.ok()) return st.status();
      }
    }
    f.stage = Finishing::Stage::kLastCheckpoint;
  }
  if (f.stage == Finishing::Stage::kLastCheckpoint) {
    // The last step's weights, what a resume continues from, written as the cadence's are: on
    // the checkpoint thread while the loop serves (at the 8B shape it held every stream 0.94 s
    // on the loop). Until it is durable the job waits here (idle_until), a cadence's write
    // still in flight first. A write that fails for want of storage is retried by Step().
    if (checkpoint_write) {
      if (auto s = CollectCheckpointWrite(/*wait=*/false); !s.ok()) return s;
      if (checkpoint_write || pending_checkpoint) return absl::OkStatus();
    }
    if (!StateWritten()) {
      if (auto s = StartCheckpoint(); !s.ok()) return s;
      if (!StateWritten()) return absl::OkStatus();  // in flight (or waiting for storage)
    }
    EndStorageWait(/*all=*/true);
    f.stage = Finishing::Stage::kBestEval;
    f.eval = EvalProgress();
  }
  if (f.stage == Finishing::Stage::kBestEval) {
    // With load_best_at_end the best evaluation's adapter replaces the last step's weights, so
    // the held-out report scores, and the merged model holds, what the job publishes.
    // (The last checkpoint wrote the best adapter if it was only in memory.)
    if (config.load_best_at_end && state.has_eval && state.best_eval_step != state.step &&
        (f.best_loaded || std::filesystem::exists(BestAdapterPath()))) {
      if (!f.best_loaded) {
        auto best = LoraAdapter::ReadPeft(BestAdapterPath());
        if (!best.ok()) return best.status();
        if (auto st = adapter.CopyWeightsFrom(*best); !st.ok()) {
          return absl::DataLossError(absl::StrCat(
              BestAdapterPath(), " does not hold the job's LoRA weights: ", st.message(),
              " (was the folder changed?); delete it and resume, or submit the job again"));
        }
        f.best_loaded = true;
      }
      auto complete = EvaluateSome(f.eval);
      if (!complete.ok()) return complete.status();
      if (!*complete) return absl::OkStatus();
      f.scored = EvaluationOf(f.eval);
      f.scored->step = state.best_eval_step;  // the weights' step, not the job's
      f.scored_step = state.best_eval_step;
    }
    f.stage = validating ? Finishing::Stage::kAnswers : Finishing::Stage::kFiles;
  }
  if (f.stage == Finishing::Stage::kAnswers) {
    // One forward a piece: a group's prompts, then a token of each of its answers (up to 128).
    // A group's cache and prompts take about what a training micro-batch took.
    if (!f.answering && static_cast<int64_t>(f.answers.examples.size()) < kAnsweredExamples) {
      auto group = ExampleAnswerer::NextGroup(
          *model, data->validation(), &f.next_answer_row,
          kAnsweredExamples - static_cast<int64_t>(f.answers.examples.size()), kAnswerTokens,
          config.micro_batch_size * config.max_seq_length);
      if (!group.empty()) {
        auto started = ExampleAnswerer::Start(*model, *tokenizer, std::move(group), kAnswerTokens,
                                              end_of_turn);
        if (!started.ok()) return started.status();
        f.answering = *std::move(started);
      }
    }
    if (f.answering) {
      auto answered = f.answering->Advance(adapter);
      if (!answered.ok()) return answered.status();
      if (answered->has_value()) {
        for (AnsweredExample& e : **answered) f.answers.Add(std::move(e));
        f.answering.reset();
      }
      return absl::OkStatus();
    }
    f.stage = Finishing::Stage::kFiles;
  }
  TrainingSummary& s = f.summary;
  if (!f.files_written) {
    s.adapter_path = (std::filesystem::path(config.output_dir) / "adapter").string();
    s.adapter_step = f.scored_step;
    if (!f.adapter_write.valid()) {
      if (validating) {
        if (auto st = WriteEvaluationReport(config.output_dir, state.step, *f.scored,
                                            data->validation().size(), f.answers, s);
            !st.ok()) {
          return RetryIfNotWritten(st, "the evaluation report");
        }
      }
      // The adapter, written and synced on a thread of its own while the loop serves
      // (idle_until: the job waits here).
      if (!f.final_adapter) {
        f.final_adapter = std::make_shared<const LoraAdapter>(adapter.HostCopy());
      }
      // An exception on the writing thread would come back out of get() (in Fail, too): a
      // status instead, as a checkpoint's write gives.
      const auto write = [adapter = f.final_adapter, path = s.adapter_path]() -> absl::Status {
        try {
          return adapter->WritePeft(path);
        } catch (const std::exception& e) {
          return absl::InternalError(absl::StrCat("writing the adapter to ", path, ": ", e.what()));
        }
      };
      try {
        f.adapter_write = std::async(std::launch::async, write);
      } catch (const std::system_error&) {  // no thread to be had: written here
        std::promise<absl::Status> here;
        here.set_value(write());
        f.adapter_write = here.get_future();
      }
    }
    if (auto st = CollectAdapterWrite(/*wait=*/false); !st.ok() || !f.files_written) return st;
  }
  if (f.merged_export.valid()) {
    if (f.merged_export.wait_for(std::chrono::milliseconds(2)) != std::future_status::ready) {
      return absl::OkStatus();
    }
    absl::Status exported = f.merged_export.get();
    if (!exported.ok() && !IsStorageFailure(exported)) return exported;
    if (!exported.ok()) {
      // Not waited for, as a checkpoint is: the adapter is what the job is for, and a wait for
      // room held it unpublished (and the jobs queued behind it) for as long as the disk stayed
      // full. The job ends with its adapter and says why the export is missing.
      s.merged_error = std::string(exported.message());
      Warn(absl::StrCat("the merged model (", s.merged_path, ") was not written: ", s.merged_error,
                        "; the adapter is published without it: merge ", s.adapter_path,
                        " into the base where there is room, with PEFT (PeftModel.from_pretrained("
                        "base, adapter).merge_and_unload().save_pretrained(folder))"));
      s.merged_path.clear();
    }
  }
  return EmitFinished(false, f.early_stopped, std::move(s));
}

absl::Status Trainer::Impl::CollectAdapterWrite(bool wait) {
  Finishing& f = *finishing;
  if (!f.adapter_write.valid()) return absl::OkStatus();
  if (!wait && f.adapter_write.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
    return absl::OkStatus();
  }
  TrainingSummary& s = f.summary;
  if (auto st = f.adapter_write.get(); !st.ok()) {
    return RetryIfNotWritten(st, absl::StrCat("the adapter (", s.adapter_path, ")"));
  }
  EndStorageWait(/*all=*/true);
  f.files_written = true;
  if (!config.export_merged_dtype.empty()) {
    // Host work only (the base checkpoint's 16-bit weights plus B A, written out): for a large
    // model a minute of it, on a thread of its own while the loop serves.
    s.merged_path = (std::filesystem::path(config.output_dir) / "merged").string();
    f.merged_export =
        std::async(std::launch::async, [folder = model_folder, adapter = f.final_adapter,
                                        path = s.merged_path, dtype = config.export_merged_dtype,
                                        chat = merged_template, abandon = f.abandon_export] {
          return WriteMergedModel(folder, *adapter, path, dtype, abandon.get(), chat);
        });
  }
  return absl::OkStatus();
}

void Trainer::Impl::WriteBestBeforeTheEnd() {
  if (!unsaved_best) return;
  // What a job that fails or is cancelled still leaves: the adapter of its best evaluation
  // (written with the next checkpoint, which will not come).
  if (auto st = WriteUnsavedBest(); !st.ok()) {
    Warn(absl::StrCat("the best evaluation's adapter (step ", state.best_eval_step,
                      ") could not be written: ", st.message()));
  }
}

absl::Status Trainer::Impl::EmitFinished(bool cancelled, bool early_stopped, TrainingSummary s) {
  SettleCheckpointWrite();
  SettleAdapterWrite();
  WriteBestBeforeTheEnd();
  done = true;
  TrainingEvent e;
  e.kind = TrainingEvent::Kind::kFinished;
  s.steps = state.step;
  s.epochs = static_cast<double>(state.micro_batches) / static_cast<double>(per_epoch);
  // As transformers' train_runtime: the training loop (its evaluations and checkpoints included),
  // not the held-out answers and merged export after the last step's checkpoint.
  const bool past_training = finishing && finishing->stage != Finishing::Stage::kLastEval;
  s.runtime_s = past_training ? state.train_seconds : seconds_before_this_run + RunSeconds();
  s.trained_tokens = state.trained_tokens;
  s.final_loss = state.last_loss;
  s.train_loss = state.step > 0 && std::isfinite(state.loss_sum)
                     ? state.loss_sum / static_cast<double>(state.step)
                     : 0.0;
  s.best_is_eval = state.has_eval;
  s.best_loss = state.has_eval ? state.best_eval_loss : state.best_train_loss;
  s.cancelled = cancelled;
  s.early_stopped = early_stopped;
  s.skipped_records = data->skipped_records();
  s.first_skipped = data->first_skipped();
  s.dropped_examples = data->dropped();
  s.truncated_examples = data->truncated();
  e.summary = std::move(s);
  Emit(e);
  return absl::OkStatus();
}

}  // namespace lorad::engine
