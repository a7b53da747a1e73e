#include "server/blocking_calls.h"

#include <exception>

#include "absl/strings/str_cat.h"
#include "server/grpc_status.h"

namespace lorad::server {

namespace {

absl::Status Stopping() {
  return absl::UnavailableError("lorad is stopping; send the call again once it is back");
}

// The call's reactor, which learns when the client is gone: gRPC calls OnCancel when the client
// cancels or the call's deadline passes (before Finish), from any thread.
class GiveUpReactor : public grpc::ServerUnaryReactor {
 public:
  explicit GiveUpReactor(std::shared_ptr<std::atomic<bool>> give_up)
      : give_up_(std::move(give_up)) {}
  void OnCancel() override { give_up_->store(true); }
  void OnDone() override { delete this; }

 private:
  std::shared_ptr<std::atomic<bool>> give_up_;
};

}  // namespace

BlockingCalls::BlockingCalls(int threads, int max_queued)
    : max_queued_(static_cast<size_t>(max_queued)) {
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { WorkLoop(); });
}

BlockingCalls::~BlockingCalls() { Stop(); }

grpc::ServerUnaryReactor* BlockingCalls::Run(grpc::CallbackServerContext* context, Work work) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_.load() && queue_.size() < max_queued_) {
      auto give_up = std::make_shared<std::atomic<bool>>(false);
      grpc::ServerUnaryReactor* reactor = new GiveUpReactor(give_up);
      queue_.push_back({reactor, std::move(give_up), std::move(work)});
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

void BlockingCalls::WorkLoop() {
  while (true) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_.load() || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      task = std::move(queue_.front());
      queue_.pop_front();
      // Under the lock: Stop() either sees this flag or has set stopping_ before the check below.
      running_.insert(task.give_up.get());
    }
    absl::Status status;
    try {
      if (stopping_.load()) {
        status = Stopping();
      } else if (task.give_up->load()) {
        status = absl::CancelledError("the call ended before its turn came");
      } else {
        status = task.work(*task.give_up);
      }
    } catch (const std::exception& e) {  // nothing a call does may end the daemon
      status = absl::InternalError(absl::StrCat("unexpected error: ", e.what()));
    } catch (...) {
      status = absl::InternalError("unexpected error");
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_.erase(task.give_up.get());
    }
    if (stopping_.load() && absl::IsCancelled(status)) status = Stopping();
    task.reactor->Finish(ToGrpcStatus(status));
  }
}

void BlockingCalls::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_.exchange(true)) return;
    for (std::atomic<bool>* give_up : running_) give_up->store(true);
  }
  cv_.notify_all();
  // The workers end the running calls (told to give up early) and answer the queued ones.
  for (auto& t : threads_) t.join();
}

}  // namespace lorad::server
