// The exposition text is also parsed by prometheus_client in tests/e2e; these check the rules
// a scraper relies on.
#include "server/metrics_registry.h"

#include <gtest/gtest.h>

namespace lorad::server {
namespace {

bool Contains(const std::string& text, const std::string& line) {
  return text.find(line) != std::string::npos;
}

TEST(MetricsRegistry, CounterRendersWithTotalSuffixAndLabels) {
  MetricsRegistry r;
  auto& c = r.AddCounter("lorad_requests_total", "Requests", {"adapter"});
  c.Inc({"a"});
  c.Inc({"a"}, 2);
  c.Inc({"b"}, -5);  // counters never go down
  const std::string text = r.Render();
  EXPECT_TRUE(Contains(text, "# TYPE lorad_requests_total counter\n"));
  EXPECT_TRUE(Contains(text, "lorad_requests_total{adapter=\"a\"} 3\n"));
  EXPECT_FALSE(Contains(text, "adapter=\"b\""));
}

TEST(MetricsRegistry, HistogramBucketsAreCumulative) {
  MetricsRegistry r;
  auto& h = r.AddHistogram("lorad_latency_seconds", "Latency", {"m"}, {0.1, 1});
  h.Observe({"x"}, 0.05);
  h.Observe({"x"}, 0.5);
  h.Observe({"x"}, 5);
  const std::string text = r.Render();
  EXPECT_TRUE(Contains(text, "lorad_latency_seconds_bucket{m=\"x\",le=\"0.1\"} 1\n"));
  EXPECT_TRUE(Contains(text, "lorad_latency_seconds_bucket{m=\"x\",le=\"1\"} 2\n"));
  EXPECT_TRUE(Contains(text, "lorad_latency_seconds_bucket{m=\"x\",le=\"+Inf\"} 3\n"));
  EXPECT_TRUE(Contains(text, "lorad_latency_seconds_count{m=\"x\"} 3\n"));
  EXPECT_TRUE(Contains(text, "lorad_latency_seconds_sum{m=\"x\"} 5.55\n"));
}

// A family without labels has its one series from the start, at 0.
TEST(MetricsRegistry, UnlabelledCountersAndHistogramsStartAtZero) {
  MetricsRegistry r;
  r.AddCounter("lorad_tokens_total", "Tokens");
  r.AddHistogram("lorad_wait_seconds", "Wait", {}, {0.1});
  const std::string text = r.Render();
  EXPECT_TRUE(Contains(text, "lorad_tokens_total 0\n")) << text;
  EXPECT_TRUE(Contains(text, "lorad_wait_seconds_bucket{le=\"+Inf\"} 0\n")) << text;
  EXPECT_TRUE(Contains(text, "lorad_wait_seconds_count 0\n")) << text;
}

TEST(MetricsRegistry, LabelValuesAreEscaped) {
  MetricsRegistry r;
  r.AddGauge("lorad_g", "G", {"v"}).Set({"a\"b\\c\nd"}, 1.5);
  EXPECT_TRUE(Contains(r.Render(), "lorad_g{v=\"a\\\"b\\\\c\\nd\"} 1.5\n"));
}

TEST(MetricsRegistry, CallbackGaugeIsEvaluatedAtScrape) {
  MetricsRegistry r;
  double v = 1;
  r.AddGaugeCallback("lorad_cb", "Callback", [&v] { return v; });
  v = 7;
  EXPECT_TRUE(Contains(r.Render(), "lorad_cb 7\n"));
}

TEST(MetricsRegistry, RejectsInvalidAndDuplicateNames) {
  MetricsRegistry r;
  EXPECT_THROW(r.AddGauge("9bad", "x"), std::invalid_argument);
  EXPECT_THROW(r.AddGauge("ok", "x", {"le"}), std::invalid_argument);
  r.AddGauge("dup", "x");
  EXPECT_THROW(r.AddGauge("dup", "x"), std::invalid_argument);
}

}  // namespace
}  // namespace lorad::server
