#include "engine/train/lr_schedule.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace lorad::engine {

absl::StatusOr<LrScheduleKind> LrScheduleKindFromName(const std::string& name) {
  if (name == "linear") return LrScheduleKind::kLinear;
  if (name == "cosine") return LrScheduleKind::kCosine;
  if (name == "constant") return LrScheduleKind::kConstant;
  return absl::InvalidArgumentError(absl::StrCat("learning-rate schedule '", name,
                                                 "' is unknown (known: linear, cosine, constant)"));
}

double LrSchedule::Factor(int64_t step) const {
  if (step < warmup_) {
    return static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup_));
  }
  const double after_warmup = static_cast<double>(std::max<int64_t>(1, total_ - warmup_));
  switch (kind_) {
    case LrScheduleKind::kConstant:
      return 1.0;
    case LrScheduleKind::kLinear:
      return std::max(0.0, static_cast<double>(total_ - step) / after_warmup);
    case LrScheduleKind::kCosine: {
      const double progress = static_cast<double>(step - warmup_) / after_warmup;
      return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
    }
  }
  return 1.0;
}

}  // namespace lorad::engine
