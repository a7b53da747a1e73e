// LogLimiter: lets one log line per key through per interval and counts those it held back, for
// events that may repeat at a request's rate (a failing device ends every request with an error,
// a client keeps retrying with a revoked token): the log says what happened without flooding,
// and one noisy key (a client, an error) does not hide the others. The count of lines held back
// is written with the key's next line, or, when none comes within the interval (a burst, then
// quiet), by HeldBackCountsWriter with the last line written. Thread-safe.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace lorad::server {

class LogLimiter {
 public:
  // Takes a count of lines held back with the key's last line written and its level.
  using HeldBackWriter =
      std::function<void(const std::string& line, int64_t held, spdlog::level::level_enum level)>;

  explicit LogLimiter(std::chrono::steady_clock::duration interval) : interval_(interval) {
    std::lock_guard<std::mutex> lock(Registry().mu);
    Registry().limiters.insert(this);
  }
  ~LogLimiter() {
    std::lock_guard<std::mutex> lock(Registry().mu);
    Registry().limiters.erase(this);
  }
  LogLimiter(const LogLimiter&) = delete;
  LogLimiter& operator=(const LogLimiter&) = delete;

  // When `line` (the line for `key`) may be written now: how many of the key's lines were held
  // back since its last one; else nothing. At kMaxKeys keys, those past their interval give way
  // to new ones (their next line would go through anyway), those with nothing held back first;
  // a count held back by a key that goes is carried to the shared key's next line. Only while
  // all are within their interval do new keys share one.
  // `level`: the one `line` is logged at, for its count written alone.
  std::optional<int64_t> Allow(const std::string& key, const std::string& line = "",
                               spdlog::level::level_enum level = spdlog::level::warn) {
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
    k.line = line;
    k.level = level;
    const int64_t held = k.held_back;
    k.held_back = 0;
    return held;
  }

  // Hands `write` each key's count of lines held back whose interval has passed with no line
  // to carry it (all of them with `all`, at shutdown), with the key's last line written; the
  // count then starts again, as after a written line.
  void TakeHeldBack(bool all, const HeldBackWriter& write) {
    const auto now = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [key, k] : keys_) {
      if (k.held_back == 0 || (!all && now - k.last < interval_)) continue;
      write(k.line, k.held_back, k.level);
      k.held_back = 0;
      k.last = now;
    }
  }

  // TakeHeldBack over every LogLimiter of the process.
  static void TakeAllHeldBack(bool all, const HeldBackWriter& write) {
    std::lock_guard<std::mutex> lock(Registry().mu);
    for (LogLimiter* limiter : Registry().limiters) limiter->TakeHeldBack(all, write);
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
    std::string line;  // the last one written, for a count written without a line of its own
    spdlog::level::level_enum level = spdlog::level::warn;  // ... and its level
  };
  // Every LogLimiter (most are function-local statics), for TakeAllHeldBack; never destroyed,
  // so a limiter destroyed at exit can still leave it.
  struct Limiters {
    std::mutex mu;
    std::set<LogLimiter*> limiters;
  };
  static Limiters& Registry() {
    static Limiters* registry = new Limiters();
    return *registry;
  }
  const std::chrono::steady_clock::duration interval_;
  std::mutex mu_;
  std::map<std::string, Key> keys_;
};

// Writes the counts no later line carried (LogLimiter::TakeAllHeldBack) every `period` while it
// lives, and all that are left when it goes (at shutdown): "N more like this ...: <last line>".
class HeldBackCountsWriter {
 public:
  explicit HeldBackCountsWriter(std::chrono::steady_clock::duration period)
      : thread_([this, period] {
          std::unique_lock<std::mutex> lock(mu_);
          while (!cv_.wait_for(lock, period, [this] { return stopping_; })) {
            lock.unlock();
            LogLimiter::TakeAllHeldBack(false, Write);
            lock.lock();
          }
        }) {}
  ~HeldBackCountsWriter() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
    LogLimiter::TakeAllHeldBack(true, Write);
  }
  HeldBackCountsWriter(const HeldBackCountsWriter&) = delete;
  HeldBackCountsWriter& operator=(const HeldBackCountsWriter&) = delete;

 private:
  // At the line's own level: counts of gRPC's debug lines stay out of an info log.
  static void Write(const std::string& line, int64_t held, spdlog::level::level_enum level) {
    spdlog::log(level, "{} more log line(s) like this one were held back: {}", held,
                line.empty() ? "(lines of several kinds)" : line);
  }

  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace lorad::server
