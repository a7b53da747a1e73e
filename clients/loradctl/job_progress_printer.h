// JobProgressPrinter: turns WatchJob events into what a person (or a log file) wants to read.
//
// On a terminal, step events redraw one progress line in place with a carriage return:
//   [##########----------]  12/24  loss 1.8342  lr 1.6e-04  2310 tok/s  ETA 41s
// and every other event (state change, eval, checkpoint, result) is printed on its own line
// above it. Elsewhere (a pipe, a file) every event is one line, so logs stay greppable.
#pragma once

#include <ostream>

#include "lorad/v1/training.pb.h"

namespace lorad::cli {

class JobProgressPrinter {
 public:
  // `total_steps` of 0 means unknown: no bar, just the step count. `evaluates_at_end`: the job has
  // a validation split, so its last step is followed by the final evaluation and the held-out
  // answers, which the ETA does not count: the watch says so then rather than sit at "ETA 0s".
  JobProgressPrinter(std::ostream& out, bool terminal, int64_t total_steps,
                     bool evaluates_at_end = false)
      : out_(out),
        terminal_(terminal),
        total_steps_(total_steps),
        evaluates_at_end_(evaluates_at_end) {}

  void Print(const lorad::v1::JobEvent& event);

  // Ends a progress line left open, so whatever comes next starts on a fresh line.
  void Finish();

 private:
  void PrintLine(const std::string& text);  // a whole line, above the progress bar
  std::string StepText(const lorad::v1::StepMetrics& step) const;

  std::ostream& out_;
  bool terminal_;
  int64_t total_steps_;
  bool evaluates_at_end_;
  bool bar_open_ = false;  // the cursor sits at the end of a progress line
};

}  // namespace lorad::cli
