// LogLimiter: lets one log line per key through per interval and counts those it held back, for
// events that may repeat at a request's rate (a failing device ends every request with an error,
// a client keeps retrying with a revoked token): the log says what happened without flooding,
// and one noisy key (a client, an error) does not hide the others. The count of lines held back
// is written with the key's next line. Thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"

namespace lorad::server {

class LogLimiter {
 public:
  explicit LogLimiter(std::chrono::steady_clock::duration interval) : interval_(interval) {}

  // When a line for `key` may be written now: how many of its lines were held back since its
  // last one; else nothing. At kMaxKeys keys, those past their interval give way to new ones
  // (their next line would go through anyway), those with nothing held back first; a count held
  // back by a key that goes is carried to the shared key's next line. Only while all are within
  // their interval do new keys share one.
  std::optional<int64_t> Allow(const std::string& key) {
    const auto now = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    auto it = keys_.find(key);
    if (it == keys_.end()) {
      for (const bool with_counts : {false, true}) {
        if (keys_.size() < kMaxKeys) break;
        int64_t carried = 0;
        for (auto k = keys_.begin(); k != keys_.end();) {
          const bool idle = !k->first.empty() && now - k->second.last >= interval_ &&
                            (with_counts || k->second.held_back == 0);
          if (idle) carried += k->second.held_back;
          k = idle ? keys_.erase(k) : std::next(k);
        }
        if (carried > 0) keys_[""].held_back += carried;
      }
      it = keys_.size() < kMaxKeys ? keys_.emplace(key, Key{}).first
                                   : keys_.emplace("", Key{}).first;
    }
    Key& k = it->second;
    if (k.written && now - k.last < interval_) {
      ++k.held_back;
      return std::nullopt;
    }
    k.written = true;
    k.last = now;
    const int64_t held = k.held_back;
    k.held_back = 0;
    return held;
  }

  // " (N more like it since the last such line)" for a count above zero, for the line's end.
  static std::string HeldBack(int64_t held) {
    return held > 0 ? absl::StrCat(" (", held, " more like it since the last such line)") : "";
  }

 private:
  static constexpr size_t kMaxKeys = 256;
  struct Key {
    bool written = false;
    std::chrono::steady_clock::time_point last;
    int64_t held_back = 0;
  };
  const std::chrono::steady_clock::duration interval_;
  std::mutex mu_;
  std::map<std::string, Key> keys_;
};

}  // namespace lorad::server
