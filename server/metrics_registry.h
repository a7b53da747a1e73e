// MetricsRegistry: counters, gauges and histograms with labels, rendered in the Prometheus text
// exposition format (version 0.0.4) for /metrics. prometheus-cpp is not packaged here, and the
// format is small.
//
// Thread rules: families are created at start-up (Add* is not meant for hot paths); Inc/Set/
// Observe and Render may be called from any thread at any time.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace lorad::server {

using LabelValues = std::vector<std::string>;

class CounterFamily {
 public:
  // Adds `value` (>= 0) to the series with these label values (created at 0 on first use).
  void Inc(const LabelValues& labels, double value = 1.0);
  double Value(const LabelValues& labels) const;
  // Drops every series whose label number `label` is `value` (an unloaded adapter's), so it is
  // no longer exported; one that comes back starts again at 0, which Prometheus reads as a reset.
  void RemoveWhere(size_t label, const std::string& value);

 private:
  friend class MetricsRegistry;
  mutable std::mutex mu_;
  std::map<LabelValues, double> series_;
};

class GaugeFamily {
 public:
  void Set(const LabelValues& labels, double value);
  void Add(const LabelValues& labels, double delta);
  double Value(const LabelValues& labels) const;
  // Drops the series (a finished job's gauges), so it is no longer exported.
  void Remove(const LabelValues& labels);

 private:
  friend class MetricsRegistry;
  mutable std::mutex mu_;
  std::map<LabelValues, double> series_;
};

class HistogramFamily {
 public:
  explicit HistogramFamily(std::vector<double> upper_bounds);
  void Observe(const LabelValues& labels, double value);

 private:
  friend class MetricsRegistry;
  struct Series {
    std::vector<double> bucket_counts;  // per upper bound, not cumulative; last is +Inf
    double sum = 0;
    double count = 0;
  };
  std::vector<double> upper_bounds_;  // sorted, finite
  mutable std::mutex mu_;
  std::map<LabelValues, Series> series_;
};

class MetricsRegistry {
 public:
  // Names must match [a-zA-Z_:][a-zA-Z0-9_:]*; label names [a-zA-Z_][a-zA-Z0-9_]*.
  // Returned references stay valid for the registry's lifetime.
  CounterFamily& AddCounter(const std::string& name, const std::string& help,
                            std::vector<std::string> label_names = {});
  GaugeFamily& AddGauge(const std::string& name, const std::string& help,
                        std::vector<std::string> label_names = {});
  // A label-less gauge whose value is computed at scrape time (uptime, memory in use).
  void AddGaugeCallback(const std::string& name, const std::string& help,
                        std::function<double()> value);
  // A labelled gauge whose series are computed at scrape time (jobs by state).
  void AddGaugeFamilyCallback(const std::string& name, const std::string& help,
                              std::vector<std::string> label_names,
                              std::function<std::vector<std::pair<LabelValues, double>>()> series);
  // The same for counts kept elsewhere that only grow (preemptions since start): typed counter,
  // so rate() applies; the name ends in _total.
  void AddCounterCallback(const std::string& name, const std::string& help,
                          std::function<double()> value);
  void AddCounterFamilyCallback(
      const std::string& name, const std::string& help, std::vector<std::string> label_names,
      std::function<std::vector<std::pair<LabelValues, double>>()> series);
  HistogramFamily& AddHistogram(const std::string& name, const std::string& help,
                                std::vector<std::string> label_names,
                                std::vector<double> upper_bounds);

  // The whole registry in the text exposition format.
  std::string Render() const;

 private:
  enum class Kind { kCounter, kGauge, kGaugeCallback, kGaugeFamilyCallback, kHistogram };
  struct Family {
    std::string name;
    std::string help;
    Kind kind;
    std::vector<std::string> label_names;
    std::unique_ptr<CounterFamily> counter;
    std::unique_ptr<GaugeFamily> gauge;
    std::function<double()> callback;
    std::function<std::vector<std::pair<LabelValues, double>>()> family_callback;
    std::unique_ptr<HistogramFamily> histogram;
    bool callback_is_counter = false;  // a callback family typed counter
  };
  // A family built whole (NewFamily, then its series or callback), then Published: a scrape
  // never sees one half made.
  static std::unique_ptr<Family> NewFamily(const std::string& name, const std::string& help,
                                           Kind kind, std::vector<std::string> label_names);
  Family& Publish(std::unique_ptr<Family> family);

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Family>> families_;  // in registration order
};

// Latency buckets in seconds, from 1 ms to an hour, for RPC and request histograms.
std::vector<double> LatencyBucketsSeconds();

}  // namespace lorad::server
