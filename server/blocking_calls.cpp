#include "server/blocking_calls.h"

#include <exception>

#include "absl/strings/str_cat.h"
#include "server/grpc_status.h"

namespace lorad::server {

namespace {

absl::Status Stopping() {
  return absl::UnavailableError("lorad is stopping; send the call again once it is back");
}

}  // namespace

BlockingCalls::BlockingCalls(int threads, int max_queued)
    : max_queued_(static_cast<size_t>(max_queued)) {
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Work(); });
}

BlockingCalls::~BlockingCalls() { Stop(); }

grpc::ServerUnaryReactor* BlockingCalls::Run(grpc::CallbackServerContext* context,
                                             std::function<absl::Status()> work) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_.load() && queue_.size() < max_queued_) {
      grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
      queue_.push_back({context, reactor, std::move(work)});
      cv_.notify_one();
      return reactor;
    }
  }
  if (stopping_.load()) return FinishUnary(context, Stopping());
  return FinishUnary(context, absl::ResourceExhaustedError(absl::StrCat(
                                  max_queued_,
                                  " calls that read files (job submissions, adapter loads) are "
                                  "waiting already; send it again shortly")));
}

void BlockingCalls::Work() {
  while (true) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_.load() || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    absl::Status status;
    try {
      if (stopping_.load()) {
        status = Stopping();
      } else if (task.context->IsCancelled()) {
        status = absl::CancelledError("the call ended before its turn came");
      } else {
        status = task.work();
      }
    } catch (const std::exception& e) {  // nothing a call does may end the daemon
      status = absl::InternalError(absl::StrCat("unexpected error: ", e.what()));
    } catch (...) {
      status = absl::InternalError("unexpected error");
    }
    if (stopping_.load() && absl::IsCancelled(status)) status = Stopping();
    task.reactor->Finish(ToGrpcStatus(status));
  }
}

void BlockingCalls::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_.exchange(true)) return;
  }
  cv_.notify_all();
  // The workers end the running calls (told to give up early) and answer the queued ones.
  for (auto& t : threads_) t.join();
}

}  // namespace lorad::server
