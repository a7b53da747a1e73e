// OpenCalls: how many calls of one kind are open, against a limit (generation streams, WatchJob
// streams, UnloadAdapter calls waiting on a thread). A call holds a Slot for as long as it is
// open, in whatever outlives its handler (a reactor, a thread); the slot gives its place back
// when it is destroyed, also after the service that handed it out is gone. OpenCallsPerKey: the
// same, counted per key (a client), each key against the same limit.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

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

class OpenCallsPerKey {
  // Keys with no open call are dropped: clients come and go (a connection is a key) by the
  // million.
  struct Counts {
    std::mutex mu;
    std::map<std::string, int64_t> open;
    void Release(const std::string& key) {
      std::lock_guard<std::mutex> lock(mu);
      auto it = open.find(key);
      if (it != open.end() && --it->second <= 0) open.erase(it);
    }
  };

 public:
  explicit OpenCallsPerKey(int64_t limit) : limit_(limit) {}

  class Slot {
   public:
    Slot(Slot&& other) noexcept : counts_(std::move(other.counts_)), key_(std::move(other.key_)) {}
    Slot& operator=(Slot&&) = delete;
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    ~Slot() {
      if (counts_) counts_->Release(key_);
    }

   private:
    friend class OpenCallsPerKey;
    Slot(std::shared_ptr<Counts> counts, std::string key)
        : counts_(std::move(counts)), key_(std::move(key)) {}
    std::shared_ptr<Counts> counts_;
    std::string key_;
  };

  // A place for one more call of `key`; nullopt when `limit` of its calls are open. *open gets
  // how many of its calls are open (the refused one not counted).
  std::optional<Slot> TryTake(const std::string& key, int64_t* open = nullptr) {
    std::lock_guard<std::mutex> lock(counts_->mu);
    int64_t& n = counts_->open[key];
    if (open != nullptr) *open = n;
    if (n >= limit_) return std::nullopt;
    ++n;
    return Slot(counts_, key);
  }
  int64_t limit() const { return limit_; }
  // Keys with a call open.
  size_t keys() const {
    std::lock_guard<std::mutex> lock(counts_->mu);
    return counts_->open.size();
  }

 private:
  int64_t limit_;
  std::shared_ptr<Counts> counts_ = std::make_shared<Counts>();
};

}  // namespace lorad::server
