#include "server/job_event_hub.h"

namespace lorad::server {

int64_t JobEventHub::Subscribe(const std::string& job_id, Listener listener) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t id = next_id_++;
  subscriptions_[id] = {job_id, std::move(listener)};
  return id;
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
  return history.stored.count(live.SerializeAsString()) > 0;
}

}  // namespace lorad::server
