// ServerConfig: the daemon's typed configuration, read from YAML (deploy/lorad.yaml) and
// overridden by command-line flags. Every key, its type, default and range are declared once,
// in server_config.cpp; errors name the key and the file:line (or the flag).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lorad::server {

// One bearer token from auth.tokens.
struct AuthToken {
  std::string name;   // who, for logs (never the token itself)
  std::string role;   // user | admin
  std::string token;  // at least 16 characters
  std::string where;  // file:line, for errors found later
};

struct ServerConfig {
  struct Model {
    std::string path;             // Hugging Face model folder (config.json, safetensors, tokenizer)
    std::string device = "auto";  // auto | cpu | cuda
    std::string base_weights = "nf4";  // nf4 (QLoRA's 4-bit base) | none (keep 16/32-bit)
    std::string chat_template;         // "" = the model folder's own; llama3 | chatml | ...
    // auto: requests' unset sampling fields take generation_config.json's values; none: greedy.
    std::string generation_config = "auto";
  } model;
  struct Engine {
    int64_t kv_cache_bytes = int64_t{1} << 30;  // the paged KV cache pool
    int64_t max_running_requests = 64;          // sequences decoding together
    int64_t max_batch_tokens = 2048;            // prefill + decode tokens per iteration
    int64_t max_prefill_chunk = 0;  // longest prefill piece of one request; 0 = max_batch_tokens
    int64_t max_resident_adapters = 8;  // adapters on the device at once
    double train_share = 0.3;  // training's least share of the GPU loop while both are busy
    bool cuda_graphs = true;   // replay decode steps from CUDA graphs (CUDA only)
    // raw: log_softmax of the model's logits; processed: after penalties, temperature and the
    // top-k/top-p/min-p filters (the distribution the token was drawn from).
    std::string logprobs_mode = "raw";
  } engine;
  struct Server {
    std::string grpc_address = "127.0.0.1:50051";
    std::string http_address = "127.0.0.1:8080";  // /metrics and /healthz
    int64_t max_request_bytes = 4 << 20;          // largest gRPC message accepted
    int64_t shutdown_grace_seconds = 10;          // how long in-flight RPCs get on shutdown
    // A connection quiet this long gets an HTTP/2 ping; one that does not answer within
    // keepalive_timeout_seconds is closed, with its calls (a client gone without closing: its
    // streams and their slots of limits.max_queued_requests would otherwise stay for hours).
    int64_t keepalive_seconds = 60;
    int64_t keepalive_timeout_seconds = 20;
    std::string tls_cert_file;  // PEM; with tls_key_file, gRPC serves TLS only
    std::string tls_key_file;
    // How often gRPC reads the two files again: a renewed certificate is served without a
    // restart (a pair it cannot use leaves the one it serves).
    int64_t tls_reload_seconds = 60;
  } server;
  struct Auth {
    // Empty: every caller is an admin, and the gRPC address must be loopback unless
    // allow_remote_without_tokens says otherwise.
    std::vector<AuthToken> tokens;
    bool allow_remote_without_tokens = false;
  } auth;
  struct Storage {
    std::string data_dir = "lorad-data";  // job database, checkpoints, adapters
    // Datasets named by jobs must resolve inside this folder; empty = <data_dir>/datasets.
    std::string dataset_root;
    // Adapters loaded over the API must resolve inside this folder; empty = <data_dir>/adapters.
    std::string adapter_root;
  } storage;
  struct Limits {
    int64_t max_queued_jobs = 64;        // SubmitJob answers RESOURCE_EXHAUSTED beyond this
    int64_t max_new_tokens = 4096;       // per request
    int64_t max_queued_requests = 1024;  // unfinished generation requests
    // Of those, one client's (its token's name, or without tokens its connection); 0: no limit.
    int64_t max_streams_per_client = 0;
    // A Generate/Chat stream's output its client has not read yet, in bytes: past it the stream
    // ends RESOURCE_EXHAUSTED (a client that stopped reading held all of it in memory).
    int64_t max_unread_stream_bytes = int64_t{8} << 20;
    int64_t max_loaded_adapters = 64;    // names LoadAdapter may hold at once
    int64_t max_prompt_bytes = 1 << 20;  // of a prompt or a chat's content
  } limits;
  struct Training {
    // Jobs trained at once (up to 16), or 0 to hold every job in the queue (maintenance; they
    // start when the daemon is restarted with 1 or more).
    int64_t max_running_jobs = 1;
    // Memory the running jobs may hold together by the planner's estimate, MiB; 0 = no budget
    // (on CUDA a job is still refused when the device's free memory cannot hold it).
    int64_t memory_budget_mib = 0;
  } training;
  struct Logging {
    std::string level = "info";  // trace | debug | info | warn | error
  } logging;
  // Where each key was last set ("file:line" or the flag), so that ValidateServerConfig's errors
  // about a key, or about two keys together, point at the line to change.
  std::map<std::string, std::string> set_at;
};

// Parses YAML text; `source` (a file name) prefixes error messages as "source:line: ...".
absl::StatusOr<ServerConfig> ParseServerConfig(const std::string& yaml_text,
                                               const std::string& source);
// Reads and parses a YAML file.
absl::StatusOr<ServerConfig> LoadServerConfig(const std::string& path);

// Sets one dotted key ("model.path") from a flag's text value with the same type and range rules
// as the file; `flag` names the flag in errors.
absl::Status ApplyConfigOverride(ServerConfig& config, const std::string& key,
                                 const std::string& value, const std::string& flag);

// Checks what no single key can: address syntax, required keys.
absl::Status ValidateServerConfig(const ServerConfig& config);

// What a valid config leaves exposed, one line each for the start-up log: bearer tokens sent in
// plain text to an address other machines reach, a TLS key or a config file holding tokens that
// other accounts can read (`config_path`: the file read, if any), a certificate out of its
// validity dates or within 14 days of its end.
std::vector<std::string> ServerConfigWarnings(const ServerConfig& config,
                                              const std::string& config_path);

// Every known key with its default and what it accepts, for `lorad --print-config-keys`.
struct ConfigKey {
  std::string key;
  std::string default_value;
  std::string accepts;  // "an integer in [1, 4096]", "one of auto, cpu, cuda", ...
};
std::vector<ConfigKey> ConfigKeysWithDefaults();

// Splits "host:port" (IPv6 as "[::1]:port"); port must be 1..65535.
absl::StatusOr<std::pair<std::string, int>> SplitHostPort(const std::string& address);

}  // namespace lorad::server
