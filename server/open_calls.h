// OpenCalls: how many calls of one kind are open, against a limit (generation streams, WatchJob
// streams, UnloadAdapter calls waiting on a thread). A call holds a Slot for as long as it is
// open, in whatever outlives its handler (a reactor, a thread); the slot gives its place back
// when it is destroyed, also after the service that handed it out is gone.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>

namespace lorad::server {

class OpenCalls {
 public:
  explicit OpenCalls(int64_t limit) : limit_(limit) {}

  class Slot {
   public:
    Slot(Slot&& other) noexcept : count_(std::move(other.count_)) {}
    Slot& operator=(Slot&&) = delete;
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    ~Slot() {
      if (count_) count_->fetch_sub(1);
    }

   private:
    friend class OpenCalls;
    explicit Slot(std::shared_ptr<std::atomic<int64_t>> count) : count_(std::move(count)) {}
    std::shared_ptr<std::atomic<int64_t>> count_;
  };

  // A place for one more call; nullopt when `limit` calls are open.
  std::optional<Slot> TryTake() {
    if (count_->fetch_add(1) >= limit_) {
      count_->fetch_sub(1);
      return std::nullopt;
    }
    return Slot(count_);
  }
  int64_t limit() const { return limit_; }

 private:
  int64_t limit_;
  std::shared_ptr<std::atomic<int64_t>> count_ = std::make_shared<std::atomic<int64_t>>(0);
};

}  // namespace lorad::server
