#include "server/job_event_hub.h"

namespace lorad::server {

int64_t JobEventHub::Subscribe(const std::string& job_id, Listener listener,
                               std::function<void()> on_close) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return 0;
  const int64_t id = next_id_++;
  subscriptions_[id] = {job_id, std::move(listener), std::move(on_close)};
  return id;
}

void JobEventHub::CloseAll() {
  std::lock_guard<std::mutex> lock(mu_);
  closed_ = true;
  for (auto& [id, sub] : subscriptions_) {
    if (sub.on_close) sub.on_close();
  }
}

void JobEventHub::Unsubscribe(int64_t subscription) {
  std::lock_guard<std::mutex> lock(mu_);
  subscriptions_.erase(subscription);
}

void JobEventHub::Publish(const lorad::v1::JobEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [id, sub] : subscriptions_) {
    if (sub.job_id == event.job_id()) sub.listener(event);
  }
}

bool HistoryHolds(const WatchHistory& history, const lorad::v1::JobEvent& live) {
  if (live.has_step()) return live.step().step() <= history.last_step;
  if (live.has_state()) return live.state() == history.last_state;
  return history.stored.count(std::hash<std::string>{}(live.SerializeAsString())) > 0;
}

}  // namespace lorad::server
