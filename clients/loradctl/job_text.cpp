#include "clients/loradctl/job_text.h"

#include <ctime>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "clients/loradctl/enum_names.h"
#include "clients/loradctl/job_spec_yaml.h"

namespace lorad::cli {

std::string JobStateName(lorad::v1::JobState state) {
  return EnumShortName(lorad::v1::JobState_descriptor()->FindValueByNumber(state));
}

std::string FormatDuration(double seconds) {
  if (seconds < 0) return "-";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s < 60) return absl::StrCat(s, "s");
  if (s < 3600) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%dh%02dm", s / 3600, (s % 3600) / 60);
}

std::string FormatTimestamp(const google::protobuf::Timestamp& time) {
  if (time.seconds() == 0 && time.nanos() == 0) return "-";
  const std::time_t t = static_cast<std::time_t>(time.seconds());
  std::tm local{};
  localtime_r(&t, &local);
  char buffer[64];
  // With its zone: times in local time are unlabelled otherwise, and run backwards across a
  // DST change (01:40 EDT, then 01:10 EST).
  std::strftime(buffer, sizeof(buffer), "%Y-%m-%d %H:%M:%S %Z", &local);
  return buffer;
}

std::string FormatProgress(int64_t step, int64_t total_steps) {
  return total_steps > 0 ? absl::StrCat(step, "/", total_steps) : absl::StrCat(step);
}

std::string FormatTrainingLoss(const lorad::v1::JobSummary& s) {
  return s.train_loss() > 0
             ? absl::StrFormat("final loss %.4f (mean %.4f)", s.final_loss(), s.train_loss())
             : absl::StrFormat("final loss %.4f", s.final_loss());
}

std::string FormatDatasetLosses(const lorad::v1::JobSummary& s) {
  std::vector<std::string> parts;
  auto count = [](int64_t n, const char* one, const char* many) {
    return absl::StrCat(n, " ", n == 1 ? one : many);
  };
  if (s.skipped_lines() > 0) {
    parts.push_back(count(s.skipped_lines(), "bad line skipped", "bad lines skipped") +
                    (s.first_skipped().empty() ? "" : " (the first: " + s.first_skipped() + ")"));
  }
  if (s.dropped_examples() > 0) {
    parts.push_back(absl::StrCat(count(s.dropped_examples(), "example", "examples"),
                                 " dropped (no response within max_seq_length)"));
  }
  if (s.truncated_examples() > 0) {
    parts.push_back(absl::StrCat(s.truncated_examples(), " truncated at max_seq_length"));
  }
  return parts.empty() ? "" : absl::StrCat("; ", absl::StrJoin(parts, ", "));
}

std::string FormatJobDetails(const lorad::v1::Job& job) {
  std::string out;
  auto line = [&out](const std::string& key, const std::string& value) {
    absl::StrAppend(&out, key, ": ", value, "\n");
  };
  line("id", job.id());
  line("state", JobStateName(job.state()));
  line("adapter", job.spec().adapter_name());
  line("created", FormatTimestamp(job.created()));
  line("started", FormatTimestamp(job.started()));
  line("finished", FormatTimestamp(job.finished()));
  line("progress", FormatProgress(job.last_step().step(), job.total_steps()));
  if (job.has_last_step() && job.last_step().step() > 0) {
    const auto& m = job.last_step();
    std::string last = absl::StrFormat("loss %.4f  lr %.3g  grad_norm %.3g  %.0f tok/s", m.loss(),
                                       m.learning_rate(), m.grad_norm(), m.tokens_per_second());
    if (job.state() == lorad::v1::JOB_STATE_RUNNING) {  // an ended job has nothing left to wait
      absl::StrAppend(&last, "  ETA ", FormatDuration(m.eta_seconds()));
      // An ETA measured a while ago (the job has been in an evaluation, a storage wait, or is
      // preparing after a restart since) says how old it is: shown as it was, it looked current.
      // By lorad's clock (last_step_age_seconds): this machine's may be off by minutes.
      if (job.has_last_step_time()) {
        const double age = job.last_step_age_seconds();
        if (age >= 10) absl::StrAppend(&last, " as of ", FormatDuration(age), " ago");
      }
    }
    line("last step", last);
  }
  if (!job.waiting_for().empty()) line("waiting for", job.waiting_for());
  if (!job.error().empty()) line("error", job.error());
  if (job.has_summary()) {
    const auto& s = job.summary();
    line("result", absl::StrFormat("adapter %s v%d, %d steps%s, %s, %d tokens in %s%s",
                                   s.adapter_name(), s.adapter_version(), s.steps(),
                                   s.early_stopped() ? " (stopped early)" : "",
                                   FormatTrainingLoss(s), s.trained_tokens(),
                                   FormatDuration(s.runtime_seconds()), FormatDatasetLosses(s)));
    if (!s.adapter_path().empty()) {
      line("adapter folder", s.adapter_step() > 0 && s.adapter_step() != s.steps()
                                 ? absl::StrCat(s.adapter_path(), " (step ", s.adapter_step(), ")")
                                 : s.adapter_path());
    }
    if (s.best_validation_loss() > 0 || !s.eval_report_path().empty()) {
      std::string validation = absl::StrFormat("best loss %.4f", s.best_validation_loss());
      // (Jobs of older lorad versions have ROUGE without the count of answers.)
      if (s.answered_examples() > 0 || s.rouge1() > 0 || s.rouge2() > 0 || s.rouge_l() > 0) {
        absl::StrAppend(&validation, absl::StrFormat(", ROUGE-1 %.3f, ROUGE-2 %.3f, ROUGE-L %.3f",
                                                     s.rouge1(), s.rouge2(), s.rouge_l()));
        if (s.answered_examples() > 0) {
          absl::StrAppend(&validation, " over ", s.answered_examples(), " answers");
        }
      } else if (!s.eval_report_path().empty()) {
        absl::StrAppend(&validation, ", no ROUGE (no held-out example has a prompt to answer)");
      }
      line("validation", validation);
    }
    if (!s.eval_report_path().empty()) line("eval report", s.eval_report_path());
    if (!s.merged_model_path().empty()) line("merged model", s.merged_model_path());
    if (!s.merged_model_error().empty()) {
      line("merged model", "not written: " + s.merged_model_error());
    }
  }
  // Indented so the block is valid YAML both inside this report and on its own.
  std::string spec = JobSpecToYaml(job.spec());
  if (!spec.empty() && spec.back() == '\n') spec.pop_back();
  absl::StrAppend(&out, "spec:\n  ", absl::StrReplaceAll(spec, {{"\n", "\n  "}}), "\n");
  return out;
}

}  // namespace lorad::cli
