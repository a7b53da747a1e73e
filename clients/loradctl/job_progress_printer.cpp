#include "clients/loradctl/job_progress_printer.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "clients/loradctl/job_text.h"

namespace lorad::cli {

namespace {

constexpr int kBarWidth = 20;
constexpr const char* kClearToEndOfLine = "\x1b[K";

constexpr char kEndingLine[] =
    "training steps done: the final evaluation and the held-out answers follow (not in the ETA)";

std::string Bar(int64_t step, int64_t total) {
  const int64_t filled = std::clamp<int64_t>(step * kBarWidth / total, 0, kBarWidth);
  return absl::StrCat("[", std::string(filled, '#'), std::string(kBarWidth - filled, '-'), "]");
}

}  // namespace

std::string JobProgressPrinter::StepText(const lorad::v1::StepMetrics& step) const {
  return absl::StrFormat("step %s  loss %.4f  lr %.2g  %.0f tok/s  ETA %s",
                         FormatProgress(step.step(), total_steps_), step.loss(),
                         step.learning_rate(), step.tokens_per_second(),
                         FormatDuration(step.eta_seconds()));
}

void JobProgressPrinter::PrintLine(const std::string& text) {
  if (bar_open_) out_ << "\r" << kClearToEndOfLine;
  out_ << text << "\n";
  bar_open_ = false;
  out_.flush();
}

void JobProgressPrinter::Print(const lorad::v1::JobEvent& event) {
  using lorad::v1::JobEvent;
  switch (event.event_case()) {
    case JobEvent::kState:
      PrintLine(absl::StrCat("state ", JobStateName(event.state())));
      break;
    case JobEvent::kStep: {
      // The trainer's count: GetJob's, read while the job was queued, is an estimate.
      if (event.step().total_steps() > 0) total_steps_ = event.step().total_steps();
      if (!terminal_) {
        PrintLine(StepText(event.step()));
      } else {
        out_ << "\r" << (total_steps_ > 0 ? Bar(event.step().step(), total_steps_) + "  " : "")
             << StepText(event.step()) << kClearToEndOfLine;
        out_.flush();
        bar_open_ = true;
      }
      if (evaluates_at_end_ && total_steps_ > 0 && event.step().step() >= total_steps_) {
        if (bar_open_) out_ << "\n";  // the full bar stays
        bar_open_ = false;
        PrintLine(kEndingLine);
      }
      break;
    }
    case JobEvent::kEval:
      PrintLine(absl::StrFormat("eval at step %d: validation loss %.4f", event.eval().step(),
                                event.eval().validation_loss()));
      break;
    case JobEvent::kCheckpoint:
      PrintLine(absl::StrCat("checkpoint at step ", event.checkpoint().step(), ": ",
                             event.checkpoint().path()));
      break;
    case JobEvent::kFinished: {
      const auto& s = event.finished();
      // Which weights were published, where not the last step's (load_best_at_end), and an early
      // stop: as `train show` says them.
      const std::string adapter_step =
          s.adapter_step() > 0 && s.adapter_step() != s.steps()
              ? absl::StrCat(" (the weights of step ", s.adapter_step(), ")")
              : "";
      PrintLine(absl::StrFormat("succeeded: adapter %s v%d%s, %d steps%s, %s, %d tokens in %s%s",
                                s.adapter_name(), s.adapter_version(), adapter_step, s.steps(),
                                s.early_stopped() ? " (stopped early)" : "", FormatTrainingLoss(s),
                                s.trained_tokens(), FormatDuration(s.runtime_seconds()),
                                FormatDatasetLosses(s)));
      break;
    }
    case JobEvent::kFailed:
      PrintLine(absl::StrCat("failed: ", event.failed()));
      break;
    case JobEvent::kWarning:
      PrintLine(absl::StrCat("warning: ", event.warning()));
      break;
    case JobEvent::EVENT_NOT_SET:
      break;  // an event kind newer than this client: nothing to show
  }
}

void JobProgressPrinter::Finish() {
  if (bar_open_) out_ << "\n";
  bar_open_ = false;
  out_.flush();
}

}  // namespace lorad::cli
