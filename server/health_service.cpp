#include "server/health_service.h"

#include <optional>
#include <utility>

namespace lorad::server {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// One Watch call: writes one status at a time, the newest one waiting while a write is in
// flight (a watcher needs the latest status, not every one in between).
class HealthService::Watcher final : public grpc::ServerWriteReactor<HealthCheckResponse> {
 public:
  Watcher(HealthService* service, std::string name) : service_(service), name_(std::move(name)) {}

  const std::string& name() const { return name_; }

  // Sends `status` unless it is the last one sent (or queued); `last`: then ends the stream.
  void Send(Status status, bool last) {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return;
    if (last) ending_ = true;
    const Status newest = queued_.value_or(sent_.value_or(HealthCheckResponse::UNKNOWN));
    if (!(sent_ || queued_) || status != newest) {
      if (writing_) {
        queued_ = status;
        return;
      }
      WriteLocked(status);
      return;
    }
    if (!writing_ && ending_) EndLocked();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    // Finished meanwhile (the client cancelled while the write was in flight): a second Finish,
    // or a write after it, aborts the process.
    if (finished_) return;
    if (!ok) {  // the client has gone
      FinishLocked(grpc::Status::CANCELLED);
      return;
    }
    if (queued_) {
      const Status next = *queued_;
      queued_.reset();
      WriteLocked(next);
      return;
    }
    if (ending_) EndLocked();
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!finished_) FinishLocked(grpc::Status::CANCELLED);
  }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(service_->mu_);
      service_->watchers_.erase(this);
    }
    delete this;
  }

 private:
  void WriteLocked(Status status) {
    reply_.set_status(status);
    sent_ = status;
    writing_ = true;
    StartWrite(&reply_);
  }
  void EndLocked() {
    FinishLocked(grpc::Status(grpc::StatusCode::UNAVAILABLE, "lorad is stopping"));
  }
  void FinishLocked(const grpc::Status& status) {
    finished_ = true;
    Finish(status);
  }

  HealthService* const service_;
  const std::string name_;
  std::mutex mu_;
  HealthCheckResponse reply_;  // the write in flight's
  std::optional<Status> sent_, queued_;
  bool writing_ = false;
  bool ending_ = false;
  bool finished_ = false;
};

HealthService::HealthService(std::vector<std::string> services)
    : services_(services.begin(), services.end()) {}

HealthService::Status HealthService::StatusOfLocked(const std::string& service) const {
  if (!service.empty() && services_.count(service) == 0)
    return HealthCheckResponse::SERVICE_UNKNOWN;
  return serving_ ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
}

void HealthService::NotifyLocked(bool last) {
  for (Watcher* watcher : watchers_) watcher->Send(StatusOfLocked(watcher->name()), last);
}

void HealthService::SetServing(bool serving) {
  std::lock_guard<std::mutex> lock(mu_);
  if (shut_down_ || serving_ == serving) return;
  serving_ = serving;
  NotifyLocked(/*last=*/false);
}

void HealthService::Shutdown() {
  std::lock_guard<std::mutex> lock(mu_);
  if (shut_down_) return;
  shut_down_ = true;
  serving_ = false;
  NotifyLocked(/*last=*/true);
}

grpc::ServerUnaryReactor* HealthService::Check(grpc::CallbackServerContext* context,
                                               const HealthCheckRequest* request,
                                               HealthCheckResponse* response) {
  auto* reactor = context->DefaultReactor();
  std::unique_lock<std::mutex> lock(mu_);
  const Status status = StatusOfLocked(request->service());
  lock.unlock();
  if (status == HealthCheckResponse::SERVICE_UNKNOWN) {
    reactor->Finish(
        grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service '" + request->service() + "'"));
    return reactor;
  }
  response->set_status(status);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<HealthCheckResponse>* HealthService::Watch(
    grpc::CallbackServerContext* /*context*/, const HealthCheckRequest* request) {
  auto* watcher = new Watcher(this, request->service());
  std::lock_guard<std::mutex> lock(mu_);
  watchers_.insert(watcher);
  watcher->Send(StatusOfLocked(request->service()), /*last=*/shut_down_);
  return watcher;
}

}  // namespace lorad::server
