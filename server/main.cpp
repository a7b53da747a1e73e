// lorad: the daemon. Flags and config in, Daemon started, signals wait, clean stop.
// Exit codes: 0 after a clean stop, 2 for a bad config, flag or model folder, 1 otherwise.
#include <grpc/support/log.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <iostream>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "server/daemon.h"
#include "server/log_limiter.h"
#include "server/server_config.h"

namespace {

constexpr int kExitRuntime = 1;
constexpr int kExitUsage = 2;

int Fail(int code, const std::string& message) {
  std::cerr << "lorad: " << message << std::endl;
  return code;
}

const char* SignalName(int number) {
  return number == SIGINT ? "SIGINT" : number == SIGHUP ? "SIGHUP" : "SIGTERM";
}

// Every connection and file lorad serves takes a descriptor, and gRPC's server (1.51) stops
// accepting connections for good after one accept fails with EMFILE (grpc#20418: the port stays
// dead until a restart while /healthz says serving). Docker and systemd start services with a
// soft limit of 1,024 (a thousand clients): take the hard limit.
// gRPC's own log lines (written to stderr in its format, one a failed TLS handshake: anyone
// who reaches the port wrote a line per connection) go through spdlog, each source line's at most
// every 10 s with the count held back (GRPC_VERBOSITY and GRPC_TRACE still choose which).
void RouteGrpcLogs() {
  gpr_set_log_function([](gpr_log_func_args* args) {
    static lorad::server::LogLimiter limiter(std::chrono::seconds(10));
    const std::string file = args->file != nullptr ? args->file : "?";
    const std::string where = absl::StrCat(file.substr(file.rfind('/') + 1), ":", args->line);
    std::string line =
        absl::StrCat("grpc ", where, ": ", args->message != nullptr ? args->message : "");
    const spdlog::level::level_enum level =
        args->severity == GPR_LOG_SEVERITY_ERROR  ? spdlog::level::warn  // often a client's
        : args->severity == GPR_LOG_SEVERITY_INFO ? spdlog::level::info
                                                  : spdlog::level::debug;
    const auto held = limiter.Allow(where, line, level);
    if (!held) return;
    spdlog::log(level, "{}{}", line, lorad::server::LogLimiter::HeldBack(*held));
  });
}

void RaiseOpenFilesLimit() {
  constexpr rlim_t kEnough = 65536;
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return;
  if (limit.rlim_cur < limit.rlim_max) {
    rlimit raised = limit;
    raised.rlim_cur = limit.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &raised) == 0) {
      spdlog::info("open-files limit raised from {} to {}", limit.rlim_cur, raised.rlim_cur);
      limit = raised;
    } else {
      spdlog::warn("cannot raise the open-files limit from {} to its hard limit {}: {}",
                   limit.rlim_cur, limit.rlim_max, std::strerror(errno));
    }
  }
  if (limit.rlim_cur < kEnough) {
    spdlog::warn(
        "the open-files limit is {}: gRPC stops accepting connections for good once it runs "
        "out; raise it to {} or more (docker run --ulimit nofile={}:{}, LimitNOFILE= in "
        "systemd, ulimit -Hn)",
        limit.rlim_cur, kEnough, kEnough, kEnough);
  }
}

}  // namespace

int main(int argc, char** argv) {
  using lorad::server::ServerConfig;
  // Local time with its UTC offset: a line is matched with clients' times (loradctl prints its
  // zone, --json and the crash mark UTC) and stays in order across a DST change.
  spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e %z] [%^%l%$] %v");
  CLI::App app{"lorad: QLoRA fine-tuning and multi-adapter serving on one GPU"};
  std::string config_path;
  struct Override {
    std::string key, value, flag;
  };
  std::vector<Override> overrides;
  bool print_keys = false;
  app.add_option("-c,--config", config_path,
                 "YAML config file, e.g. deploy/lorad.yaml (without one: the built-in defaults, "
                 "see --print-config-keys)");
  auto add_override = [&](const std::string& flag, const std::string& key,
                          const std::string& help) {
    app.add_option_function<std::string>(
        flag,
        [&overrides, key, flag](const std::string& v) {
          overrides.push_back({key, v, flag});
        },
        help + " (overrides " + key + ")");
  };
  add_override("--model", "model.path", "Hugging Face model folder");
  add_override("--device", "model.device", "auto, cpu or cuda");
  add_override("--grpc-address", "server.grpc_address", "gRPC listen address host:port");
  add_override("--http-address", "server.http_address", "HTTP (/metrics, /healthz) host:port");
  add_override("--data-dir", "storage.data_dir", "folder for jobs, checkpoints and adapters");
  add_override("--log-level", "logging.level", "trace, debug, info, warn or error");
  app.add_option_function<std::vector<std::string>>(
         "--set",
         [&overrides](const std::vector<std::string>& items) {
           for (const auto& item : items) {
             const auto eq = item.find('=');
             if (eq == std::string::npos || eq == 0) {
               throw CLI::ValidationError("--set", "'" + item + "' is not KEY=VALUE");
             }
             overrides.push_back({item.substr(0, eq), item.substr(eq + 1), "--set"});
           }
         },
         "KEY=VALUE: set any config key, e.g. --set engine.train_share=0.5 (repeat --set for "
         "several)")
      ->take_all()
      ->allow_extra_args(false);
  app.add_flag("--print-config-keys", print_keys, "print every config key with its default");
  app.set_version_flag("--version", std::string("lorad ") + LORAD_VERSION);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : kExitUsage;
  }

  if (print_keys) {
    // YAML, with what each key accepts as a comment.
    for (const auto& k : lorad::server::ConfigKeysWithDefaults()) {
      std::cout << k.key << ": " << k.default_value << "  # " << k.accepts << "\n";
    }
    return 0;
  }

  ServerConfig config;
  if (!config_path.empty()) {
    auto loaded = lorad::server::LoadServerConfig(config_path);
    if (!loaded.ok()) return Fail(kExitUsage, std::string(loaded.status().message()));
    config = *loaded;
  }
  // CLI11 runs the callbacks by option, not in command-line order: a key given twice (--set and
  // its own flag) would silently take either value, so it is an error.
  std::map<std::string, std::string> set_by;
  for (const Override& o : overrides) {
    if (auto [it, added] = set_by.emplace(o.key, o.flag); !added) {
      return Fail(kExitUsage, o.key + ": set twice on the command line (" + it->second + " and " +
                                  o.flag + "); give it once");
    }
    auto status = lorad::server::ApplyConfigOverride(config, o.key, o.value, o.flag);
    if (!status.ok()) return Fail(kExitUsage, std::string(status.message()));
  }
  if (auto status = lorad::server::ValidateServerConfig(config); !status.ok()) {
    return Fail(kExitUsage, std::string(status.message()));
  }
  spdlog::set_level(spdlog::level::from_str(config.logging.level));
  RouteGrpcLogs();
  for (const std::string& warning : lorad::server::ServerConfigWarnings(config, config_path)) {
    spdlog::warn("{}", warning);
  }
  RaiseOpenFilesLimit();

  // A log piped to a reader that has gone (`lorad | tee`, Ctrl-C stops tee first) fails its
  // writes instead of killing lorad mid-shutdown; sockets already send with MSG_NOSIGNAL.
  std::signal(SIGPIPE, SIG_IGN);
  // Block the stop signals before any thread starts so only the thread below receives them.
  // One thread takes them from here on. A first signal during start-up exits at once: loading a
  // large model takes minutes, no job runs yet and nothing is half-written (a signal in the
  // instant between the end of Start and `serving` below is treated the same, as kill -9 would
  // be: running jobs resume from their last checkpoint). After start-up the first signal starts
  // the clean shutdown below, and a second one exits at once. The state is never freed: the
  // thread may still wait on it while the process exits.
  struct StopSignals {
    sigset_t set;
    std::mutex mutex;
    bool serving = false;
    lorad::server::Daemon* daemon = nullptr;  // while serving and stopping
    std::promise<int> first_while_serving;
  };
  auto* stop = new StopSignals;
  sigemptyset(&stop->set);
  sigaddset(&stop->set, SIGINT);
  sigaddset(&stop->set, SIGTERM);
  // The terminal closing (an SSH session dropped, the window of `make run` closed) stops lorad as
  // Ctrl-C does: its default action killed it mid-step, counted as an unclean stop. Unless it was
  // started to outlive its terminal (nohup: SIGHUP ignored), which a blocked signal would undo.
  struct sigaction hangup {};
  if (sigaction(SIGHUP, nullptr, &hangup) == 0 && hangup.sa_handler != SIG_IGN) {
    sigaddset(&stop->set, SIGHUP);
  }
  pthread_sigmask(SIG_BLOCK, &stop->set, nullptr);
  std::thread([stop] {
    int first = 0;
    sigwait(&stop->set, &first);
    {
      std::lock_guard<std::mutex> lock(stop->mutex);
      if (!stop->serving) {
        spdlog::warn("received {} during start-up: stopped before serving", SignalName(first));
        spdlog::shutdown();
        std::_Exit(0);
      }
    }
    stop->first_while_serving.set_value(first);
    int again = 0;
    sigwait(&stop->set, &again);
    spdlog::warn(
        "second stop signal: exiting now; running jobs resume from their last checkpoint at the "
        "next start");
    // The operator's choice, not a death: the crash-loop guard must not count it against the
    // running jobs (three impatient stops failed a job). The job database gets 2 s for that.
    std::thread([] {
      std::this_thread::sleep_for(std::chrono::seconds(3));
      std::_Exit(kExitRuntime);
    }).detach();
    absl::Status recorded = absl::OkStatus();
    {
      std::lock_guard<std::mutex> lock(stop->mutex);
      if (stop->daemon != nullptr) {
        recorded = stop->daemon->RecordForcedStop(std::chrono::seconds(2));
      }
    }
    if (recorded.ok()) {
      spdlog::warn("the forced stop is recorded: not counted as a crash");
    } else {
      spdlog::warn(
          "the job database did not record the forced stop ({}): the next start counts it as a "
          "crash of the jobs that were running",
          std::string(recorded.message()));
    }
    spdlog::shutdown();
    std::_Exit(kExitRuntime);
  }).detach();

  // Counts of log lines held back that no later line carried, every 10 s and at the end (made
  // before the daemon, so it goes after it).
  lorad::server::HeldBackCountsWriter held_back_counts(std::chrono::seconds(10));
  lorad::server::Daemon daemon(config);
  if (auto status = daemon.Start(); !status.ok()) {
    const bool usage = absl::IsInvalidArgument(status) || absl::IsNotFound(status);
    return Fail(usage ? kExitUsage : kExitRuntime, std::string(status.message()));
  }
  std::future<int> stop_signal = stop->first_while_serving.get_future();
  {
    std::lock_guard<std::mutex> lock(stop->mutex);
    stop->serving = true;
    stop->daemon = &daemon;
  }
  spdlog::info("received {}, shutting down (a second signal stops at once)",
               SignalName(stop_signal.get()));
  daemon.Shutdown();
  std::lock_guard<std::mutex> lock(stop->mutex);
  stop->daemon = nullptr;
  return 0;
}
