// LogLimiter: lets one log line through per interval and counts those it held back, for events
// that may repeat at a request's rate (a failing device ends every request with an error, a
// client keeps retrying with a revoked token): the log says what happened without flooding.
// Thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"

namespace lorad::server {

class LogLimiter {
 public:
  explicit LogLimiter(std::chrono::steady_clock::duration interval) : interval_(interval) {}

  // When a line may be written now: how many were held back since the last one; else nothing.
  std::optional<int64_t> Allow() {
    const auto now = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    if (written_ && now - last_ < interval_) {
      ++held_back_;
      return std::nullopt;
    }
    written_ = true;
    last_ = now;
    const int64_t held = held_back_;
    held_back_ = 0;
    return held;
  }

  // " (N more like it since the last line)" for a count above zero, for the line's end.
  static std::string HeldBack(int64_t held) {
    return held > 0 ? absl::StrCat(" (", held, " more like it since the last such line)") : "";
  }

 private:
  const std::chrono::steady_clock::duration interval_;
  std::mutex mu_;
  bool written_ = false;
  std::chrono::steady_clock::time_point last_;
  int64_t held_back_ = 0;
};

}  // namespace lorad::server
