// JobEventHub: fans each job's live events out to its WatchJob streams. Publishing never blocks
// on a watcher: listeners only queue the event (a slow watcher never slows training).
//
// Thread rules: any thread may publish, subscribe or unsubscribe. Listeners run on the
// publisher's thread, under the hub's lock: they must be quick and must not call back into the hub.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <unordered_set>

#include "lorad/v1/training.pb.h"

namespace lorad::server {

class JobEventHub {
 public:
  using Listener = std::function<void(const lorad::v1::JobEvent&)>;

  // Returns a subscription id for Unsubscribe, or 0 once CloseAll ran (the daemon is stopping).
  // `on_close` runs (under the hub's lock, like listeners) when CloseAll ends every stream.
  int64_t Subscribe(const std::string& job_id, Listener listener,
                    std::function<void()> on_close = nullptr);
  void Unsubscribe(int64_t subscription);
  void Publish(const lorad::v1::JobEvent& event);
  // The daemon is stopping: every watcher's stream ends now (a stream open on a running job
  // would otherwise hold the shutdown for its whole grace period), and no new one starts.
  void CloseAll();

 private:
  struct Subscription {
    std::string job_id;
    Listener listener;
    std::function<void()> on_close;
  };
  bool closed_ = false;
  std::mutex mu_;
  int64_t next_id_ = 1;
  std::map<int64_t, Subscription> subscriptions_;
};

// What a WatchJob stream's history holds: it is read from the job store after the stream
// subscribed, and the job runner stores a step or a state before it publishes it, so an event
// that arrived live while the history was read may be in the history too.
struct WatchHistory {
  int64_t last_step = -1;  // the history's last step, -1 for none
  lorad::v1::JobState last_state = lorad::v1::JOB_STATE_UNSPECIFIED;  // its last state event
  // The stored events it replayed, serialized as published, by their hash: a watcher of a long
  // job evaluated every step held megabytes of them (a collision, one in 2^64, would drop one
  // live evaluation or checkpoint that the job's history still holds).
  std::unordered_set<size_t> stored;
};

// Whether `live` (an event published after the history's store read began) is already in it: a
// step up to its last one, its last state again, or a stored event it replayed.
bool HistoryHolds(const WatchHistory& history, const lorad::v1::JobEvent& live);

}  // namespace lorad::server
