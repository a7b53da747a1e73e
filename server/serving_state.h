// ServingState: the daemon's lifecycle as health checks report it. Written by the daemon's main
// thread, read by the gRPC health service and the HTTP /healthz handler.
#pragma once

#include <atomic>
#include <string>

namespace lorad::server {

enum class Lifecycle { kLoading, kServing, kDraining };

class ServingState {
 public:
  void Set(Lifecycle state) { state_.store(state); }
  Lifecycle Get() const { return state_.load(); }
  bool Serving() const { return Get() == Lifecycle::kServing; }
  std::string Name() const {
    switch (Get()) {
      case Lifecycle::kLoading:
        return "loading";
      case Lifecycle::kServing:
        return "serving";
      case Lifecycle::kDraining:
        return "draining";
    }
    return "unknown";
  }

 private:
  std::atomic<Lifecycle> state_{Lifecycle::kLoading};
};

}  // namespace lorad::server
