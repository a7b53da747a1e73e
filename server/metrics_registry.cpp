#include "server/metrics_registry.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <stdexcept>

namespace lorad::server {
namespace {

bool ValidName(const std::string& name, bool allow_colon) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                    (allow_colon && c == ':') || (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  return ec == std::errc() ? std::string(buf, end) : std::to_string(v);
}

// Label values escape backslash, double quote and newline; HELP escapes backslash and newline.
std::string Escape(const std::string& s, bool quote) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (quote && c == '"') {
      out += "\\\"";
    } else {
      out += c;
    }
  }
  return out;
}

// {a="x",b="y"} plus an optional extra label (le for histogram buckets).
std::string LabelSet(const std::vector<std::string>& names, const LabelValues& values,
                     const std::string& extra_name = "", const std::string& extra_value = "") {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    out += out.empty() ? "{" : ",";
    out += names[i] + "=\"" + Escape(i < values.size() ? values[i] : "", true) + "\"";
  }
  if (!extra_name.empty()) {
    out += out.empty() ? "{" : ",";
    out += extra_name + "=\"" + extra_value + "\"";
  }
  if (!out.empty()) out += "}";
  return out;
}

}  // namespace

void CounterFamily::Inc(const LabelValues& labels, double value) {
  if (!(value >= 0)) return;  // counters only go up; NaN is ignored too
  std::lock_guard<std::mutex> lock(mu_);
  series_[labels] += value;
}

double CounterFamily::Value(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = series_.find(labels);
  return it == series_.end() ? 0.0 : it->second;
}

void CounterFamily::RemoveWhere(size_t label, const std::string& value) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = series_.begin(); it != series_.end();) {
    it = label < it->first.size() && it->first[label] == value ? series_.erase(it) : std::next(it);
  }
}

void GaugeFamily::Set(const LabelValues& labels, double value) {
  std::lock_guard<std::mutex> lock(mu_);
  series_[labels] = value;
}

void GaugeFamily::Add(const LabelValues& labels, double delta) {
  std::lock_guard<std::mutex> lock(mu_);
  series_[labels] += delta;
}

void GaugeFamily::Remove(const LabelValues& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  series_.erase(labels);
}

double GaugeFamily::Value(const LabelValues& labels) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = series_.find(labels);
  return it == series_.end() ? 0.0 : it->second;
}

HistogramFamily::HistogramFamily(std::vector<double> upper_bounds)
    : upper_bounds_(std::move(upper_bounds)) {
  std::sort(upper_bounds_.begin(), upper_bounds_.end());
}

void HistogramFamily::Observe(const LabelValues& labels, double value) {
  if (std::isnan(value)) return;
  std::lock_guard<std::mutex> lock(mu_);
  Series& s = series_[labels];
  if (s.bucket_counts.empty()) s.bucket_counts.assign(upper_bounds_.size() + 1, 0.0);
  const size_t bucket =
      std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), value) - upper_bounds_.begin();
  s.bucket_counts[bucket] += 1;
  s.sum += value;
  s.count += 1;
}

std::unique_ptr<MetricsRegistry::Family> MetricsRegistry::NewFamily(
    const std::string& name, const std::string& help, Kind kind,
    std::vector<std::string> label_names) {
  if (!ValidName(name, /*allow_colon=*/true)) {
    throw std::invalid_argument("invalid metric name: " + name);
  }
  for (const auto& l : label_names) {
    if (!ValidName(l, /*allow_colon=*/false) || l == "le") {
      throw std::invalid_argument("invalid label name '" + l + "' for metric " + name);
    }
  }
  auto family = std::make_unique<Family>();
  family->name = name;
  family->help = help;
  family->kind = kind;
  family->label_names = std::move(label_names);
  return family;
}

MetricsRegistry::Family& MetricsRegistry::Publish(std::unique_ptr<Family> family) {
  // Whole before a scrape (Render, on the HTTP thread) can see it: families are added while the
  // daemon starts, and /metrics answers from the first moment.
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& f : families_) {
    if (f->name == family->name) {
      throw std::invalid_argument("metric registered twice: " + family->name);
    }
  }
  families_.push_back(std::move(family));
  return *families_.back();
}

CounterFamily& MetricsRegistry::AddCounter(const std::string& name, const std::string& help,
                                           std::vector<std::string> label_names) {
  const bool unlabelled = label_names.empty();
  auto f = NewFamily(name, help, Kind::kCounter, std::move(label_names));
  f->counter = std::make_unique<CounterFamily>();
  // One series and no label to wait for: exported as 0 from the start (rate() and absent() then
  // see it before the first event).
  if (unlabelled) f->counter->series_[{}] = 0;
  return *Publish(std::move(f)).counter;
}

GaugeFamily& MetricsRegistry::AddGauge(const std::string& name, const std::string& help,
                                       std::vector<std::string> label_names) {
  auto f = NewFamily(name, help, Kind::kGauge, std::move(label_names));
  f->gauge = std::make_unique<GaugeFamily>();
  return *Publish(std::move(f)).gauge;
}

void MetricsRegistry::AddGaugeCallback(const std::string& name, const std::string& help,
                                       std::function<double()> value) {
  auto f = NewFamily(name, help, Kind::kGaugeCallback, {});
  f->callback = std::move(value);
  Publish(std::move(f));
}

void MetricsRegistry::AddGaugeFamilyCallback(
    const std::string& name, const std::string& help, std::vector<std::string> label_names,
    std::function<std::vector<std::pair<LabelValues, double>>()> series) {
  auto f = NewFamily(name, help, Kind::kGaugeFamilyCallback, std::move(label_names));
  f->family_callback = std::move(series);
  Publish(std::move(f));
}

void MetricsRegistry::AddCounterCallback(const std::string& name, const std::string& help,
                                         std::function<double()> value) {
  auto f = NewFamily(name, help, Kind::kGaugeCallback, {});
  f->callback = std::move(value);
  f->callback_is_counter = true;
  Publish(std::move(f));
}

void MetricsRegistry::AddCounterFamilyCallback(
    const std::string& name, const std::string& help, std::vector<std::string> label_names,
    std::function<std::vector<std::pair<LabelValues, double>>()> series) {
  auto f = NewFamily(name, help, Kind::kGaugeFamilyCallback, std::move(label_names));
  f->family_callback = std::move(series);
  f->callback_is_counter = true;
  Publish(std::move(f));
}

HistogramFamily& MetricsRegistry::AddHistogram(const std::string& name, const std::string& help,
                                               std::vector<std::string> label_names,
                                               std::vector<double> upper_bounds) {
  const bool unlabelled = label_names.empty();
  auto f = NewFamily(name, help, Kind::kHistogram, std::move(label_names));
  f->histogram = std::make_unique<HistogramFamily>(std::move(upper_bounds));
  if (unlabelled) {  // as an unlabelled counter: all zeros from the start
    f->histogram->series_[{}].bucket_counts.assign(f->histogram->upper_bounds_.size() + 1, 0.0);
  }
  return *Publish(std::move(f)).histogram;
}

std::string MetricsRegistry::Render() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  for (const auto& fp : families_) {
    const Family& f = *fp;
    const char* type = f.kind == Kind::kCounter || f.callback_is_counter ? "counter"
                       : f.kind == Kind::kHistogram                      ? "histogram"
                                                                         : "gauge";
    // The 0.0.4 text format names the family exactly as its samples (counters keep _total);
    // prometheus_client's parser and Prometheus itself both expect that.
    out += "# HELP " + f.name + " " + Escape(f.help, false) + "\n";
    out += "# TYPE " + f.name + " " + type + "\n";
    switch (f.kind) {
      case Kind::kCounter: {
        std::lock_guard<std::mutex> l(f.counter->mu_);
        for (const auto& [labels, v] : f.counter->series_) {
          out += f.name + LabelSet(f.label_names, labels) + " " + FormatValue(v) + "\n";
        }
        break;
      }
      case Kind::kGauge: {
        std::lock_guard<std::mutex> l(f.gauge->mu_);
        for (const auto& [labels, v] : f.gauge->series_) {
          out += f.name + LabelSet(f.label_names, labels) + " " + FormatValue(v) + "\n";
        }
        break;
      }
      case Kind::kGaugeCallback:
        out += f.name + " " + FormatValue(f.callback()) + "\n";
        break;
      case Kind::kGaugeFamilyCallback:
        for (const auto& [labels, v] : f.family_callback()) {
          out += f.name + LabelSet(f.label_names, labels) + " " + FormatValue(v) + "\n";
        }
        break;
      case Kind::kHistogram: {
        const HistogramFamily& h = *f.histogram;
        std::lock_guard<std::mutex> l(h.mu_);
        for (const auto& [labels, s] : h.series_) {
          double cumulative = 0;
          for (size_t i = 0; i <= h.upper_bounds_.size(); ++i) {
            cumulative += s.bucket_counts[i];
            const std::string le =
                i < h.upper_bounds_.size() ? FormatValue(h.upper_bounds_[i]) : "+Inf";
            out += f.name + "_bucket" + LabelSet(f.label_names, labels, "le", le) + " " +
                   FormatValue(cumulative) + "\n";
          }
          out +=
              f.name + "_sum" + LabelSet(f.label_names, labels) + " " + FormatValue(s.sum) + "\n";
          out += f.name + "_count" + LabelSet(f.label_names, labels) + " " + FormatValue(s.count) +
                 "\n";
        }
        break;
      }
    }
  }
  return out;
}

std::vector<double> LatencyBucketsSeconds() {
  // Up to an hour: a long generation on a busy GPU, or a long wait in the queue, took minutes,
  // and everything past 60 s fell into +Inf, where no percentile can be read.
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,  1,
          2.5,   5,      10,    30,   60,    120,  300, 600,  1800, 3600};
}

}  // namespace lorad::server
