// BlockingCalls: the slow part of unary calls (counting a job's dataset, reading an adapter's
// files) on threads of lorad's own. gRPC runs callback handlers on its I/O threads: a handler
// that reads a 5 GB dataset for a minute holds up the other calls those threads serve (a stream's
// next token waits on them too). Bounded: `threads` run at once and at most `max_queued` wait;
// beyond that a call is refused with RESOURCE_EXHAUSTED. Stop() lets the running ones end
// (stopping() tells them to give up early) and answers the queued ones UNAVAILABLE.
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
#include <mutex>
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

  // Runs `work` on a worker and ends the call with the status it returns (its response filled
  // by `work`); a call its client cancelled (or whose deadline passed) while it waited ends
  // CANCELLED without running: a job submitted twice by a client retrying after its deadline
  // would be queued twice.
  grpc::ServerUnaryReactor* Run(grpc::CallbackServerContext* context,
                                std::function<absl::Status()> work);

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
    grpc::CallbackServerContext* context;
    grpc::ServerUnaryReactor* reactor;
    std::function<absl::Status()> work;
  };
  void Work();

  const size_t max_queued_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  std::atomic<bool> stopping_{false};
  std::vector<std::thread> threads_;
};

}  // namespace lorad::server
