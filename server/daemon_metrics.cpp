// Daemon's Prometheus metrics of the process (build, uptime, model, TLS certificate) and of the
// engine (requests, KV cache, adapters, memory, the GPU loop's time) (daemon.h).
#include "server/daemon.h"
#include "server/server_config.h"

namespace lorad::server {

void Daemon::RegisterProcessMetrics() {
  const engine::ModelConfig& model = engine_->model_config();
  metrics_
      .AddGauge("lorad_build_info", "lorad build and runtime facts; the value is always 1",
                {"version", "torch_version", "device", "cuda_kernels"})
      .Set(
          {
            LORAD_VERSION, engine_->device().torch_version, engine_->device().device,
#if defined(LORAD_WITH_CUDA)
                "on"
#else
                "off"
#endif
          },
          1);
  metrics_.AddGaugeCallback("lorad_process_uptime_seconds", "Seconds since lorad started", [this] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  });
  // An alert on it comes before clients start refusing a certificate that expired while lorad
  // ran; it follows renewals (ServedTlsPair).
  if (tls_) {
    metrics_.AddGaugeCallback("lorad_tls_certificate_expiry_timestamp_seconds",
                              "When the served TLS certificate expires (Unix time)",
                              [tls = tls_.get()] { return static_cast<double>(tls->not_after()); });
  }
  metrics_
      .AddGauge("lorad_model_info", "The served base model; the value is always 1",
                {"architecture", "layers", "hidden_size", "vocab_size"})
      .Set({model.architecture, std::to_string(model.num_hidden_layers),
            std::to_string(model.hidden_size), std::to_string(model.vocab_size)},
           1);
}

void Daemon::RegisterEngineMetrics() {
  engine::Engine* e = engine_.get();
  metrics_.AddGaugeCallback("lorad_num_requests_running", "Generation requests decoding now",
                            [e] { return e->Stats().inference.running; });
  metrics_.AddGaugeCallback("lorad_num_requests_waiting",
                            "Generation requests waiting for admission",
                            [e] { return e->Stats().inference.waiting; });
  metrics_.AddGaugeCallback("lorad_kv_cache_usage_perc",
                            "Fraction of the paged KV cache blocks in use (0..1)",
                            [e] { return e->Stats().inference.kv_cache_usage; });
  metrics_.AddCounterCallback(
      "lorad_preemptions_total", "Sequences preempted (and later recomputed) since start",
      [e] { return static_cast<double>(e->Stats().inference.preemptions); });
  metrics_.AddCounterCallback(
      "lorad_decode_graph_replays_total", "Decode steps replayed from CUDA graphs since start",
      [e] { return static_cast<double>(e->Stats().inference.graph_replays); });
  metrics_.AddCounterCallback(
      "lorad_adapter_stack_builds_total",
      "Copies of a new set of adapters into the batch's LoRA stack since start",
      [e] { return static_cast<double>(e->Stats().inference.lora_stacks_built); });
  metrics_.AddGaugeCallback("lorad_adapters_resident", "LoRA adapters on the device now",
                            [e] { return e->Stats().adapters_resident; });
  metrics_.AddGaugeCallback("lorad_adapters_loaded", "LoRA adapter versions held (host copies)",
                            [e] { return static_cast<double>(e->adapters().List().size()); });
  metrics_.AddGaugeFamilyCallback(
      "lorad_memory_bytes",
      "Device memory by use: base model, adapters, the batch's adapter stack, KV cache", {"use"},
      [e] {
        const engine::EngineStats s = e->Stats();
        return std::vector<std::pair<LabelValues, double>>{
            {{"base"}, static_cast<double>(s.base_bytes)},
            {{"adapters"}, static_cast<double>(s.adapter_device_bytes)},
            {{"adapter_stack"}, static_cast<double>(s.adapter_stack_bytes)},
            {{"kv_cache"}, static_cast<double>(s.kv_cache_bytes)}};
      });
  metrics_.AddCounterFamilyCallback(
      "lorad_gpu_loop_seconds_total", "GPU loop time spent on each kind of work since start",
      {"work"}, [e] {
        const engine::EngineStats s = e->Stats();
        return std::vector<std::pair<LabelValues, double>>{{{"inference"}, s.inference_seconds},
                                                           {{"training"}, s.train_seconds}};
      });
}

}  // namespace lorad::server
