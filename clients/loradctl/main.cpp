// loradctl: the command-line client of lorad. Parses the command line (CLI11), opens one gRPC
// channel and runs one command; the commands themselves live in *_commands.cpp.
#include <grpc/support/log.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "clients/loradctl/adapter_commands.h"
#include "clients/loradctl/connection.h"
#include "clients/loradctl/exit_codes.h"
#include "clients/loradctl/generation_commands.h"
#include "clients/loradctl/training_commands.h"

namespace {

// CLI11's PositiveNumber / NonNegativeNumber print their range with DBL_MAX written out in full
// ("not in range 0.000000 to 17976931348623157..."): say the bound instead.
CLI::Validator AtLeast(double minimum) {
  const std::string bound = ">= " + std::to_string(static_cast<int>(minimum));
  return CLI::Validator(
      [minimum, bound](std::string& value) -> std::string {
        double number = 0;
        if (!CLI::detail::lexical_cast(value, number)) return "'" + value + "' is not a number";
        if (number < minimum) return "must be " + bound;
        return "";
      },
      bound);
}
const CLI::Validator kAtLeastOne = AtLeast(1);
const CLI::Validator kNotNegative = AtLeast(0);

// --timeout: 0 (each call's default) up to 1e7 seconds (115 days). nan passed a ">= 0" check and
// set no deadline at all; inf or 1e300 overflowed the clock and failed every call at once.
constexpr double kMaxTimeoutSeconds = 1e7;
const CLI::Validator kTimeoutSeconds(
    [](std::string& value) -> std::string {
      double number = 0;
      if (!CLI::detail::lexical_cast(value, number) || !std::isfinite(number)) {
        return "'" + value + "' is not a number of seconds";
      }
      if (number < 0 || number > kMaxTimeoutSeconds) return "must be 0 .. 1e7 seconds";
      return "";
    },
    "0 .. 1e7");

using lorad::cli::Connection;

// Sampling flags are shared by `generate` and `chat`. CLI11 2.1 has no std::optional options,
// so values land in plain fields and `count()` says whether the user gave them.
struct SamplingFlags {
  int32_t max_new_tokens = 0;
  double temperature = 0, top_p = 0, min_p = 0, repetition_penalty = 0;
  int32_t top_k = 0;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  std::vector<std::pair<CLI::Option*, std::function<void(lorad::cli::SamplingOptions&)>>> setters;

  void Add(CLI::App* app) {
    auto add = [&](CLI::Option* option, std::function<void(lorad::cli::SamplingOptions&)> set) {
      setters.emplace_back(option, std::move(set));
    };
    add(app->add_option("--max-new-tokens", max_new_tokens, "tokens to generate at most")
            ->check(kAtLeastOne),
        [this](auto& s) { s.max_new_tokens = max_new_tokens; });
    add(app->add_option("--temperature", temperature,
                        "0 = greedy; a flag left out takes the model's default "
                        "(generation_config.json)"),
        [this](auto& s) { s.temperature = temperature; });
    add(app->add_option("--top-k", top_k, "0 = off"), [this](auto& s) { s.top_k = top_k; });
    add(app->add_option("--top-p", top_p, "nucleus sampling, in (0, 1]"),
        [this](auto& s) { s.top_p = top_p; });
    add(app->add_option("--min-p", min_p, "in [0, 1); 0 = off"),
        [this](auto& s) { s.min_p = min_p; });
    add(app->add_option("--repetition-penalty", repetition_penalty, "1 = off"),
        [this](auto& s) { s.repetition_penalty = repetition_penalty; });
    // A whole number in [0, 2^64): CLI11 would wrap "-5" into 2^64 - 5.
    add(app->add_option("--seed", seed, "makes sampling reproducible (0 .. 2^64-1)")
            ->check(CLI::Validator(
                [](std::string& value) -> std::string {
                  uint64_t parsed = 0;
                  return absl::SimpleAtoi(value, &parsed) && value.front() != '-' &&
                                 value.front() != '+'
                             ? ""
                             : "'" + value + "' is not a whole number in [0, 2^64)";
                },
                "UINT")),
        [this](auto& s) { s.seed = seed; });
    // One value a flag (repeated for several): taking every following word would take the
    // prompt after it as a second stop string.
    app->add_option("--stop", stop, "stop string (repeat for several)")->allow_extra_args(false);
  }

  lorad::cli::SamplingOptions Get() const {
    lorad::cli::SamplingOptions options;
    for (const auto& [option, set] : setters) {
      if (option->count() > 0) set(options);
    }
    options.stop = stop;
    return options;
  }
};

// host:port with a port in 1..65535 ("[::1]:50051" too); gRPC target URIs ("unix:/path",
// "dns:///host:port") pass as they are. gRPC itself would dial port 0 for "host:notaport" and
// wrap 99999 around, and only say it cannot connect.
std::string CheckAddress(std::string& value) {
  const std::string from = " (given by --address or LORAD_ADDRESS)";
  // A URL's scheme (http://) is no gRPC target: gRPC would resolve it as a host name and fail
  // with a DNS error. gRPC's own schemes (unix:, dns:, passthrough:, xds:, ...) pass.
  for (const char* scheme : {"http://", "https://", "grpc://", "grpcs://"}) {
    if (absl::StartsWith(absl::AsciiStrToLower(value), scheme)) {
      return "'" + value + "'" + from +
             ": loradctl speaks gRPC to host:port (or a gRPC target such as unix:/path or "
             "dns:///host:port); leave out the scheme";
    }
  }
  if (absl::StrContains(value, "://")) return "";
  for (const char* scheme : {"unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:"}) {
    if (absl::StartsWith(value, scheme)) return "";
  }
  const size_t colon = value.rfind(':');
  int port = 0;
  if (colon == std::string::npos || colon == 0) {
    return "'" + value + "'" + from + " is not host:port";
  }
  const bool port_ok = absl::SimpleAtoi(value.substr(colon + 1), &port) && port >= 1 &&
                       port <= 65535 && value[colon + 1] != '+' && value[colon + 1] != '-';
  if (value[0] != '[' && value.find(':') != colon) {
    // "::1:50051", or "::1" alone: which group is the port cannot be told.
    return "'" + value + "'" + from +
           " looks like an IPv6 address without brackets: write [ADDRESS]:PORT, e.g. "
           "[::1]:50051";
  }
  if (!port_ok) {
    return "'" + value + "'" + from + " has no valid port (1..65535)";
  }
  return "";
}

// The commands one level under the deepest command given ("submit, watch, ..." after "train").
std::string CommandNames(const CLI::App& app) {
  const CLI::App* level = &app;
  for (bool deeper = true; deeper;) {
    deeper = false;
    for (const CLI::App* sub : level->get_subcommands({})) {
      if (sub->parsed()) {
        level = sub;
        deeper = true;
        break;
      }
    }
  }
  std::vector<std::string> names;
  for (const CLI::App* sub : level->get_subcommands({})) names.push_back(sub->get_name());
  return absl::StrJoin(names, ", ");
}

}  // namespace

int main(int argc, char** argv) {
  // gRPC's own log lines (a failed TLS handshake's "E1207 ... Handshake failed") came before
  // loradctl's one-line error, which says the same with what to do; unless asked for them.
  if (std::getenv("GRPC_VERBOSITY") == nullptr && std::getenv("GRPC_TRACE") == nullptr) {
    gpr_set_log_function([](gpr_log_func_args*) {});
  }
  CLI::App app{
      "loradctl: submit and watch QLoRA fine-tuning jobs, manage adapters and generate "
      "text with a running lorad daemon"};
  app.footer(lorad::cli::ExitCodesHelp());
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("loradctl ") + LORAD_VERSION);
  app.fallthrough();  // global options may also follow the command

  lorad::cli::ConnectionOptions connection_options;
  app.add_option("--address", connection_options.address, "lorad gRPC address host:port")
      ->envname("LORAD_ADDRESS")
      ->capture_default_str()
      ->check(CLI::Validator(CheckAddress, "HOST:PORT"));
  app.add_option("--token", connection_options.token,
                 "bearer token, sent as `authorization: Bearer <token>` (other local "
                 "accounts see arguments in ps: prefer LORAD_TOKEN)")
      ->envname("LORAD_TOKEN");  // checked by Connection::Create, once one source has won
  app.add_option("--token-file", connection_options.token_file,
                 "read the bearer token from this file (its line ending dropped); keep it "
                 "chmod 600")
      ->envname("LORAD_TOKEN_FILE");
  app.add_option("--timeout", connection_options.timeout_seconds,
                 "deadline per call in seconds (default: 60 for single calls, 600 for "
                 "submit, delete, load and unload, none for generate/chat; never for watch)")
      ->check(kTimeoutSeconds);
  app.add_option("--ca-cert", connection_options.ca_cert_path,
                 "use TLS, trusting this PEM CA bundle")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-server-name", connection_options.tls_server_name,
                 "with --ca-cert: the name the server's certificate must carry, when it is not "
                 "the address's host (an SSH tunnel to 127.0.0.1, an address by IP)");

  // The command to run, chosen by the subcommand callbacks once parsing has succeeded.
  std::function<int(Connection&)> command;

  // ---- train ----
  CLI::App* train = app.add_subcommand("train", "fine-tuning jobs")->require_subcommand(1);
  std::string yaml_path, job_id;
  bool watch_after_submit = false;
  CLI::App* submit = train->add_subcommand("submit",
                                           "submit a job described by a YAML file "
                                           "(fields of lorad.v1.JobSpec); prints its id");
  submit->add_option("FILE", yaml_path, "job YAML file (- reads stdin)")->required();
  submit->add_flag("--watch", watch_after_submit, "then follow the job as `train watch` does");
  std::string request_id;
  submit->add_option("--request-id", request_id,
                     "your id for this submission (letters, digits, . _ : -): run again with "
                     "the same id, it prints the job the first run queued instead of queuing "
                     "another");
  submit->callback([&] {
    command = [&](Connection& c) {
      return lorad::cli::RunTrainSubmit(c, yaml_path, request_id, watch_after_submit);
    };
  });

  int64_t from_step = 0;
  CLI::App* watch = train->add_subcommand(
      "watch", "stream a job's progress until it ends; exit 0 only if it succeeded");
  watch->add_option("ID", job_id, "job id")->required();
  watch->add_option("--from-step", from_step, "replay history from this step")->check(kNotNegative);
  watch->callback([&] {
    command = [&](Connection& c) { return lorad::cli::RunTrainWatch(c, job_id, from_step); };
  });

  std::vector<std::string> states;
  int limit = 50;
  CLI::App* list = train->add_subcommand("ls", "list jobs, newest first");
  list->add_option("--state", states,
                   "only jobs in this state: queued, running, succeeded, failed, cancelled "
                   "(repeat for several)");
  list->add_option("--limit", limit, "show at most N jobs")
      ->check(kAtLeastOne)
      ->capture_default_str();
  bool list_json = false;
  list->add_flag("--json", list_json, "print the jobs as JSON (every field), for scripts");
  list->callback([&] {
    command = [&](Connection& c) { return lorad::cli::RunTrainList(c, states, limit, list_json); };
  });

  bool show_json = false;
  CLI::App* show = train->add_subcommand("show", "a job's state, metrics and spec");
  show->add_option("ID", job_id, "job id")->required();
  bool show_spec = false;
  show->add_flag("--json", show_json, "print the whole lorad.v1.Job as JSON");
  show->add_flag("--spec", show_spec,
                 "print only the spec, as a job file `train submit` takes (edit and resubmit)")
      ->excludes("--json");
  show->callback([&] {
    const auto format = show_json   ? lorad::cli::JobShowFormat::kJson
                        : show_spec ? lorad::cli::JobShowFormat::kSpec
                                    : lorad::cli::JobShowFormat::kText;
    command = [&, format](Connection& c) { return lorad::cli::RunTrainShow(c, job_id, format); };
  });

  CLI::App* cancel = train->add_subcommand("cancel", "cancel a job in any state");
  cancel->add_option("ID", job_id, "job id")->required();
  cancel->callback(
      [&] { command = [&](Connection& c) { return lorad::cli::RunTrainCancel(c, job_id); }; });

  CLI::App* retry = train->add_subcommand(
      "retry", "queue a failed or cancelled job again: it resumes from its last checkpoint");
  retry->add_option("ID", job_id, "job id")->required();
  retry->callback(
      [&] { command = [&](Connection& c) { return lorad::cli::RunTrainRetry(c, job_id); }; });

  CLI::App* remove = train->add_subcommand(
      "rm", "delete an ended job: its record, history and files (checkpoints, adapter, export)");
  remove->add_option("ID", job_id, "job id")->required();
  remove->callback(
      [&] { command = [&](Connection& c) { return lorad::cli::RunTrainDelete(c, job_id); }; });

  // ---- adapters ----
  CLI::App* adapters = app.add_subcommand("adapters", "LoRA adapters")->require_subcommand(1);
  std::string adapter_name, adapter_path;
  int64_t adapter_version = 0;
  bool adapters_json = false;
  CLI::App* adapters_list =
      adapters->add_subcommand("ls", "list loaded adapters and their versions");
  adapters_list->add_flag("--json", adapters_json,
                          "print the lorad.v1.ListAdaptersResponse as JSON (for scripts)");
  adapters_list->callback([&] {
    command = [&](Connection& c) { return lorad::cli::RunAdaptersList(c, adapters_json); };
  });
  CLI::App* load = adapters->add_subcommand(
      "load", "load a PEFT adapter folder (under the daemon's adapter root) as NAME");
  load->add_option("NAME", adapter_name, "adapter name")->required();
  load->add_option("PATH", adapter_path,
                   "PEFT folder on the daemon's machine: absolute, or relative to its adapter root")
      ->required();
  load->callback([&] {
    command = [&](Connection& c) {
      return lorad::cli::RunAdaptersLoad(c, adapter_name, adapter_path);
    };
  });
  CLI::App* unload = adapters->add_subcommand("unload", "unload an adapter");
  unload->add_option("NAME", adapter_name, "adapter name")->required();
  unload->add_option("--version", adapter_version, "only this version (default: all)")
      ->check(kNotNegative);
  unload->callback([&] {
    command = [&](Connection& c) {
      return lorad::cli::RunAdaptersUnload(c, adapter_name, adapter_version);
    };
  });

  // ---- generate / chat ----
  lorad::cli::GenerationOptions generation;
  std::string prompt;
  SamplingFlags generate_flags;
  CLI::App* generate = app.add_subcommand("generate", "complete PROMPT, streaming to stdout");
  generate->add_option("--adapter", generation.adapter, "adapter name (default: base model)");
  generate->add_flag("--usage", generation.show_usage, "print token counts and timings to stderr");
  generate_flags.Add(generate);
  generate->add_option("PROMPT", prompt, "the prompt, or - to read it from stdin")->required();
  generate->callback([&] {
    command = [&](Connection& c) {
      generation.sampling = generate_flags.Get();
      return lorad::cli::RunGenerate(c, generation, prompt, std::cin);
    };
  });

  lorad::cli::ChatOptions chat_options;
  SamplingFlags chat_flags;
  CLI::App* chat = app.add_subcommand(
      "chat", "interactive chat: one message per line on stdin, replies streamed to stdout");
  chat->add_option("--adapter", chat_options.generation.adapter,
                   "adapter name (default: base model)");
  chat->add_option("--template", chat_options.template_name,
                   "chat template: llama3, chatml, llama2, mistral, alpaca (default: the model's)");
  chat->add_option("--system", chat_options.system, "system message");
  chat->add_option("--prefill", chat_options.prefill,
                   "start of every reply, which the model continues (e.g. '{' for JSON)");
  chat->add_flag("--usage", chat_options.generation.show_usage,
                 "print token counts and timings to stderr");
  chat_flags.Add(chat);
  chat->callback([&] {
    command = [&](Connection& c) {
      chat_options.generation.sampling = chat_flags.Get();
      return lorad::cli::RunChat(c, chat_options, std::cin);
    };
  });

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // "loradctl bogus": CLI11 would say only that a subcommand is required.
    if (dynamic_cast<const CLI::RequiredError*>(&e) != nullptr && !app.remaining().empty()) {
      std::cerr << "loradctl: unknown command '" << app.remaining().front()
                << "' (commands: " << CommandNames(app) << "; see loradctl --help)" << std::endl;
      return lorad::cli::kExitUsage;
    }
    return app.exit(e) == 0 ? lorad::cli::kExitOk : lorad::cli::kExitUsage;
  }
  // A token given on the command line wins over a token file from the environment, and the
  // other way round (an exported LORAD_TOKEN is overridden for one command); two at one level
  // are refused (Connection::Create).
  const auto given = [&](const std::string& flag) {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--") break;
      if (arg == flag || absl::StartsWith(arg, flag + "=")) return true;
    }
    return false;
  };
  if (given("--token") && !given("--token-file")) connection_options.token_file.clear();
  if (given("--token-file") && !given("--token")) connection_options.token.clear();
  auto connection = Connection::Create(connection_options);
  if (!connection.ok()) {
    std::cerr << "loradctl: " << connection.status().message() << std::endl;
    return lorad::cli::kExitUsage;
  }
  const int code = command(**connection);
  // Output that could not be written (a full disk, a pipe closed with SIGPIPE ignored) is a
  // failure: a submitted job's id, a listing, were lost.
  std::cout.flush();
  if (!std::cout && code == lorad::cli::kExitOk) {
    std::cerr << "loradctl: cannot write the output (" << std::strerror(errno) << ")" << std::endl;
    return lorad::cli::kExitError;
  }
  return code;
}
