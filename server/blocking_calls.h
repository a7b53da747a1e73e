// BlockingCalls: the slow part of unary calls (counting a job's dataset, reading an adapter's
// files) on threads of lorad's own. gRPC runs callback handlers on its I/O threads: a handler
// that reads a 5 GB dataset for a minute holds up the other calls those threads serve (a stream's
// next token waits on them too). Bounded: `threads` run at once and at most `max_queued` wait;
// beyond that a call is refused with RESOURCE_EXHAUSTED. Stop() lets the running ones end
// (their give-up flag tells them to stop early) and answers the queued ones UNAVAILABLE.
//
// Thread rules: Run() from gRPC handlers, Stop() once from the daemon's shutdown, before the
// gRPC server waits for its calls (they cannot end before their reactors finish).
#pragma once

#include <grpcpp/server_context.h>
#include <grpcpp/support/server_callback.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"

namespace lorad::server {

class BlockingCalls {
 public:
  BlockingCalls(int threads, int max_queued);
  ~BlockingCalls();
  BlockingCalls(const BlockingCalls&) = delete;
  BlockingCalls& operator=(const BlockingCalls&) = delete;

  // `give_up` turns true once the call's client is gone (it cancelled, or its deadline passed)
  // or Stop() began: long work returns early, and work that changes state checks it last.
  using Work = std::function<absl::Status(const std::atomic<bool>& give_up)>;

  // Runs `work` on a worker and ends the call with the status it returns (its response filled
  // by `work`); a call its client cancelled (or whose deadline passed) while it waited ends
  // CANCELLED without running: the client saw it fail, so a job it submits again after its
  // deadline would be queued twice.
  grpc::ServerUnaryReactor* Run(grpc::CallbackServerContext* context, Work work);

  // True once Stop() began: long work checks it and returns early.
  const std::atomic<bool>& stopping() const { return stopping_; }
  // Calls waiting for a worker.
  size_t queued() const {
    std::lock_guard<std::mutex> lock(mu_);
    return queue_.size();
  }
  void Stop();

 private:
  struct Task {
    grpc::ServerUnaryReactor* reactor;
    std::shared_ptr<std::atomic<bool>> give_up;  // shared with the reactor that sets it
    BlockingCalls::Work work;
  };
  void WorkLoop();

  const size_t max_queued_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  std::set<std::atomic<bool>*> running_;  // the running tasks' give-up flags, for Stop()
  std::atomic<bool> stopping_{false};
  std::vector<std::thread> threads_;
};

}  // namespace lorad::server
