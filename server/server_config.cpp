#include "server/server_config.h"

#include <arpa/inet.h>
#include <sys/stat.h>
#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/runtime/durable_file.h"
#include "re2/re2.h"
#include "server/tls_files.h"

namespace lorad::server {
namespace {

// How to set one key from a YAML scalar. `where` is "file:line" or "flag --x" for errors.
using Setter =
    std::function<absl::Status(ServerConfig&, const YAML::Node&, const std::string& where)>;

struct Field {
  Setter set;
  std::function<std::string(const ServerConfig&)> show;  // the current value, as text
  std::string accepts;  // what a value may be, for --print-config-keys ("an integer in [1, 64]")
};

// `quote`: false for a value that may be a secret (auth.tokens), which errors do not repeat.
absl::Status TypeError(const std::string& where, const std::string& key, const std::string& want,
                       const YAML::Node& node, bool quote = true) {
  std::string got = node.IsScalar()     ? (quote ? absl::StrCat("'", node.Scalar(), "'")
                                                 : "a single value (not shown: it may be a token)")
                    : node.IsMap()      ? "a mapping"
                    : node.IsSequence() ? "a list"
                                        : "nothing";
  return absl::InvalidArgumentError(
      absl::StrCat(where, ": ", key, ": expected ", want, ", got ", got));
}

Field StringField(const std::string& key, std::function<std::string&(ServerConfig&)> ref,
                  std::vector<std::string> allowed = {}) {
  Field f;
  f.set = [key, ref, allowed](ServerConfig& c, const YAML::Node& n,
                              const std::string& where) -> absl::Status {
    if (!n.IsScalar()) return TypeError(where, key, "a string", n);
    const std::string v = n.Scalar();
    if (!allowed.empty() && std::find(allowed.begin(), allowed.end(), v) == allowed.end()) {
      // An empty choice reads as "" (model.chat_template's "the model folder's own").
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": ", key, ": '", v, "' is not one of ",
          absl::StrJoin(allowed, ", ", [](std::string* out, const std::string& choice) {
            absl::StrAppend(out, choice.empty() ? "\"\"" : choice);
          })));
    }
    ref(c) = v;
    return absl::OkStatus();
  };
  f.show = [ref](const ServerConfig& c) { return ref(const_cast<ServerConfig&>(c)); };
  f.accepts =
      allowed.empty()
          ? "text"
          : absl::StrCat("one of ",
                         absl::StrJoin(allowed, ", ", [](std::string* out, const std::string& v) {
                           absl::StrAppend(out, v.empty() ? "\"\"" : v);
                         }));
  return f;
}

// `field`, saying more precisely what it accepts than its type does.
Field Accepting(std::string accepts, Field field) {
  field.accepts = std::move(accepts);
  return field;
}

// A file or folder: a shell's `~` or `$VARIABLE` in it is refused (taken as they are, `~/data`
// made a folder named `~` in the working directory, which relative paths are relative to).
Field PathField(const std::string& key, std::function<std::string&(ServerConfig&)> ref) {
  Field f = StringField(key, ref);
  f.set = [key, set = f.set](ServerConfig& c, const YAML::Node& n,
                             const std::string& where) -> absl::Status {
    if (auto s = set(c, n, where); !s.ok()) return s;
    static const RE2 kShell(R"re(^~|\$\{?[A-Za-z_])re");
    const std::string v = n.Scalar();
    if (RE2::PartialMatch(v, kShell)) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": ", key, ": '", v, "' holds ", v[0] == '~' ? "a '~'" : "a $VARIABLE",
          ", which lorad does not expand: write the whole path (a relative one is relative to "
          "the folder lorad starts in)"));
    }
    return absl::OkStatus();
  };
  f.accepts = "a path (absolute, or relative to the folder lorad starts in)";
  return f;
}

Field IntField(const std::string& key, std::function<int64_t&(ServerConfig&)> ref, int64_t min,
               int64_t max) {
  Field f;
  f.set = [key, ref, min, max](ServerConfig& c, const YAML::Node& n,
                               const std::string& where) -> absl::Status {
    int64_t v = 0;
    if (!n.IsScalar() || !absl::SimpleAtoi(n.Scalar(), &v)) {
      double d = 0;  // an integer too large for int64 is out of range, not "not an integer"
      if (n.IsScalar() && absl::SimpleAtod(n.Scalar(), &d) && std::trunc(d) == d &&
          std::abs(d) >= 9.2e18) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": ", key, ": ", n.Scalar(),
                                                       " is out of range [", min, ", ", max, "]"));
      }
      return TypeError(where, key, "an integer", n);
    }
    if (v < min || v > max) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": ", key, ": ", v, " is out of range [", min, ", ", max, "]"));
    }
    ref(c) = v;
    return absl::OkStatus();
  };
  f.show = [ref](const ServerConfig& c) {
    return std::to_string(ref(const_cast<ServerConfig&>(c)));
  };
  f.accepts = absl::StrCat("an integer in [", min, ", ", max, "]");
  return f;
}

Field DoubleField(const std::string& key, std::function<double&(ServerConfig&)> ref, double min,
                  double max) {
  Field f;
  f.set = [key, ref, min, max](ServerConfig& c, const YAML::Node& n,
                               const std::string& where) -> absl::Status {
    double v = 0;
    if (!n.IsScalar() || !absl::SimpleAtod(n.Scalar(), &v)) {
      return TypeError(where, key, "a number", n);
    }
    if (!(v >= min && v <= max)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": ", key, ": ", n.Scalar(),
                                                     " is out of range [", min, ", ", max, "]"));
    }
    ref(c) = v;
    return absl::OkStatus();
  };
  f.show = [ref](const ServerConfig& c) { return absl::StrCat(ref(const_cast<ServerConfig&>(c))); };
  f.accepts = absl::StrCat("a number in [", min, ", ", max, "]");
  return f;
}

Field BoolField(const std::string& key, std::function<bool&(ServerConfig&)> ref) {
  Field f;
  f.set = [key, ref](ServerConfig& c, const YAML::Node& n,
                     const std::string& where) -> absl::Status {
    const std::string v = n.IsScalar() ? n.Scalar() : "";
    // YAML's spellings (True, TRUE, as loradctl's job files take them) and the usual words.
    const std::string lower = absl::AsciiStrToLower(v);
    if (lower == "true" || lower == "yes" || lower == "on") {
      ref(c) = true;
    } else if (lower == "false" || lower == "no" || lower == "off") {
      ref(c) = false;
    } else {
      return TypeError(where, key, "true or false", n);
    }
    return absl::OkStatus();
  };
  f.show = [ref](const ServerConfig& c) {
    return ref(const_cast<ServerConfig&>(c)) ? std::string("true") : std::string("false");
  };
  f.accepts = "true or false";
  return f;
}

// auth.tokens: a list of {name, role, token} mappings. A value of the wrong shape is not
// quoted in the error (it may be a token, and the error goes to the log).
Field TokensField() {
  Field f;
  f.set = [](ServerConfig& c, const YAML::Node& n, const std::string& where) -> absl::Status {
    if (!n.IsSequence()) {
      return TypeError(where, "auth.tokens", "a list of {name, role, token}", n, /*quote=*/false);
    }
    c.auth.tokens.clear();
    for (size_t i = 0; i < n.size(); ++i) {
      const YAML::Node& item = n[i];
      const std::string at =
          absl::StrCat(where.substr(0, where.rfind(':')), ":", item.Mark().line + 1);
      const std::string key = absl::StrCat("auth.tokens[", i, "]");
      if (!item.IsMap()) {
        return TypeError(at, key, "a mapping {name, role, token}", item, /*quote=*/false);
      }
      AuthToken t;
      t.where = at;
      std::set<std::string> given;
      for (const auto& kv : item) {
        const std::string k = kv.first.Scalar();
        if (!given.insert(k).second) {
          return absl::InvalidArgumentError(
              absl::StrCat(at, ": ", key, ".", k, ": set twice in one token; keep one"));
        }
        if (!kv.second.IsScalar()) return TypeError(at, key + "." + k, "a string", kv.second);
        if (k == "name") {
          t.name = kv.second.Scalar();
        } else if (k == "role") {
          t.role = kv.second.Scalar();
        } else if (k == "token") {
          t.token = kv.second.Scalar();
        } else {
          return absl::InvalidArgumentError(
              absl::StrCat(at, ": ", key, ": unknown key '", k, "' (known: name, role, token)"));
        }
      }
      if (given.count("token") == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(at, ": ", key, ": no token (give each entry name, role and token)"));
      }
      if (t.role != "user" && t.role != "admin") {
        return absl::InvalidArgumentError(
            absl::StrCat(at, ": ", key, ".role: '", t.role, "' is not one of user, admin"));
      }
      if (t.name.empty()) t.name = key;  // logs and errors name the caller by it
      for (const AuthToken& other : c.auth.tokens) {
        if (other.name == t.name) {
          return absl::InvalidArgumentError(
              absl::StrCat(at, ": ", key, ".name: '", t.name, "' is also the name of the token at ",
                           other.where, "; give each token its own name"));
        }
      }
      c.auth.tokens.push_back(std::move(t));
    }
    return absl::OkStatus();
  };
  f.show = [](const ServerConfig& c) {
    return c.auth.tokens.empty() ? std::string("[]")
                                 : absl::StrCat("[", c.auth.tokens.size(), " tokens]");
  };
  f.accepts = "a list of {name, role: user or admin, token: at least 16 characters}";
  return f;
}

// The schema: every key lorad knows (a map: listed by key). Add a key here and to ServerConfig.
const std::map<std::string, Field>& Schema() {
  static const auto* kSchema = new std::map<std::string, Field>{
      {"model.path",
       PathField("model.path", [](ServerConfig& c) -> std::string& { return c.model.path; })},
      {"model.device",
       StringField("model.device", [](ServerConfig& c) -> std::string& { return c.model.device; },
                   {"auto", "cpu", "cuda"})},
      {"model.base_weights",
       StringField("model.base_weights",
                   [](ServerConfig& c) -> std::string& { return c.model.base_weights; },
                   {"nf4", "none"})},
      {"model.chat_template",
       StringField("model.chat_template",
                   [](ServerConfig& c) -> std::string& { return c.model.chat_template; },
                   {"", "llama3", "chatml", "llama2", "mistral", "alpaca"})},
      {"model.generation_config",
       StringField("model.generation_config",
                   [](ServerConfig& c) -> std::string& { return c.model.generation_config; },
                   {"auto", "none"})},
      {"engine.kv_cache_bytes",
       IntField(
           "engine.kv_cache_bytes",
           [](ServerConfig& c) -> int64_t& { return c.engine.kv_cache_bytes; }, int64_t{1} << 20,
           int64_t{1} << 40)},
      {"engine.max_running_requests",
       IntField(
           "engine.max_running_requests",
           [](ServerConfig& c) -> int64_t& { return c.engine.max_running_requests; }, 1, 4096)},
      {"engine.max_batch_tokens",
       IntField(
           "engine.max_batch_tokens",
           [](ServerConfig& c) -> int64_t& { return c.engine.max_batch_tokens; }, 16, 1 << 20)},
      {"engine.max_prefill_chunk",
       IntField(
           "engine.max_prefill_chunk",
           [](ServerConfig& c) -> int64_t& { return c.engine.max_prefill_chunk; }, 0, 1 << 20)},
      {"engine.max_resident_adapters",
       IntField(
           "engine.max_resident_adapters",
           [](ServerConfig& c) -> int64_t& { return c.engine.max_resident_adapters; }, 1, 4096)},
      {"engine.train_share",
       DoubleField(
           "engine.train_share", [](ServerConfig& c) -> double& { return c.engine.train_share; }, 0,
           0.95)},
      {"engine.cuda_graphs",
       BoolField("engine.cuda_graphs",
                 [](ServerConfig& c) -> bool& { return c.engine.cuda_graphs; })},
      {"engine.logprobs_mode",
       StringField("engine.logprobs_mode",
                   [](ServerConfig& c) -> std::string& { return c.engine.logprobs_mode; },
                   {"raw", "processed"})},
      {"server.grpc_address", Accepting("host:port ([::1]:port for IPv6)",
                                        StringField("server.grpc_address",
                                                    [](ServerConfig& c) -> std::string& {
                                                      return c.server.grpc_address;
                                                    }))},
      {"server.http_address", Accepting("host:port ([::1]:port for IPv6)",
                                        StringField("server.http_address",
                                                    [](ServerConfig& c) -> std::string& {
                                                      return c.server.http_address;
                                                    }))},
      {"server.max_request_bytes",
       IntField(
           "server.max_request_bytes",
           [](ServerConfig& c) -> int64_t& { return c.server.max_request_bytes; }, 1024,
           int64_t{1} << 30)},
      {"server.shutdown_grace_seconds",
       IntField(
           "server.shutdown_grace_seconds",
           [](ServerConfig& c) -> int64_t& { return c.server.shutdown_grace_seconds; }, 0, 3600)},
      {"server.keepalive_seconds",
       IntField(
           "server.keepalive_seconds",
           [](ServerConfig& c) -> int64_t& { return c.server.keepalive_seconds; }, 1, 86400)},
      {"server.keepalive_timeout_seconds",
       IntField(
           "server.keepalive_timeout_seconds",
           [](ServerConfig& c) -> int64_t& { return c.server.keepalive_timeout_seconds; }, 1,
           3600)},
      {"server.tls_cert_file",
       PathField("server.tls_cert_file",
                 [](ServerConfig& c) -> std::string& { return c.server.tls_cert_file; })},
      {"server.tls_key_file",
       PathField("server.tls_key_file",
                 [](ServerConfig& c) -> std::string& { return c.server.tls_key_file; })},
      {"server.tls_reload_seconds",
       IntField(
           "server.tls_reload_seconds",
           [](ServerConfig& c) -> int64_t& { return c.server.tls_reload_seconds; }, 1, 86400)},
      {"auth.tokens", TokensField()},
      {"auth.allow_remote_without_tokens",
       BoolField("auth.allow_remote_without_tokens",
                 [](ServerConfig& c) -> bool& { return c.auth.allow_remote_without_tokens; })},
      {"storage.data_dir",
       PathField("storage.data_dir",
                 [](ServerConfig& c) -> std::string& { return c.storage.data_dir; })},
      {"storage.dataset_root",
       PathField("storage.dataset_root",
                 [](ServerConfig& c) -> std::string& { return c.storage.dataset_root; })},
      {"storage.adapter_root",
       PathField("storage.adapter_root",
                 [](ServerConfig& c) -> std::string& { return c.storage.adapter_root; })},
      {"limits.max_new_tokens",
       IntField(
           "limits.max_new_tokens",
           [](ServerConfig& c) -> int64_t& { return c.limits.max_new_tokens; }, 1, 1 << 20)},
      {"limits.max_queued_requests",
       IntField(
           "limits.max_queued_requests",
           [](ServerConfig& c) -> int64_t& { return c.limits.max_queued_requests; }, 1, 1 << 20)},
      {"limits.max_streams_per_client",
       IntField(
           "limits.max_streams_per_client",
           [](ServerConfig& c) -> int64_t& { return c.limits.max_streams_per_client; }, 0,
           1 << 20)},
      {"limits.max_unread_stream_bytes",
       IntField(
           "limits.max_unread_stream_bytes",
           [](ServerConfig& c) -> int64_t& { return c.limits.max_unread_stream_bytes; }, 4096,
           int64_t{1} << 30)},
      {"limits.max_loaded_adapters",
       IntField(
           "limits.max_loaded_adapters",
           [](ServerConfig& c) -> int64_t& { return c.limits.max_loaded_adapters; }, 1, 1 << 16)},
      {"limits.max_prompt_bytes",
       IntField(
           "limits.max_prompt_bytes",
           [](ServerConfig& c) -> int64_t& { return c.limits.max_prompt_bytes; }, 1,
           int64_t{1} << 30)},
      {"limits.max_queued_jobs",
       IntField(
           "limits.max_queued_jobs",
           [](ServerConfig& c) -> int64_t& { return c.limits.max_queued_jobs; }, 1, 100000)},
      {"training.max_running_jobs",
       IntField(
           "training.max_running_jobs",
           [](ServerConfig& c) -> int64_t& { return c.training.max_running_jobs; }, 0, 16)},
      {"training.memory_budget_mib",
       IntField(
           "training.memory_budget_mib",
           [](ServerConfig& c) -> int64_t& { return c.training.memory_budget_mib; }, 0,
           int64_t{1} << 24)},
      {"logging.level",
       StringField("logging.level", [](ServerConfig& c) -> std::string& { return c.logging.level; },
                   {"trace", "debug", "info", "warn", "error"})},
  };
  return *kSchema;
}

std::string Where(const std::string& source, const YAML::Node& node) {
  // yaml-cpp marks are 0-based.
  return absl::StrCat(source, ":", node.Mark().line + 1);
}

// Walks a mapping, descending into sections, and sets every leaf through the schema. A key may
// also be written dotted (`server.grpc_address: ...`). `first_line` is shared by the whole walk
// and keyed by the full name: YAML lets a later key silently replace an earlier one, and a
// dotted key may repeat one written inside its section.
absl::Status Walk(ServerConfig& config, const YAML::Node& map, const std::string& prefix,
                  const std::string& source, std::map<std::string, int>& first_line) {
  for (const auto& kv : map) {
    const std::string key = prefix.empty() ? kv.first.Scalar() : prefix + "." + kv.first.Scalar();
    const auto [seen, added] = first_line.emplace(key, kv.first.Mark().line + 1);
    if (!added) {
      return absl::InvalidArgumentError(absl::StrCat(Where(source, kv.first), ": '", key,
                                                     "' is set twice (also at line ", seen->second,
                                                     "); keep one"));
    }
    const auto& schema = Schema();
    auto field = schema.find(key);
    if (field != schema.end()) {
      if (kv.second.IsNull()) continue;  // "key:" with no value keeps the default
      auto status = field->second.set(config, kv.second, Where(source, kv.first));
      if (!status.ok()) return status;
      config.set_at[key] = Where(source, kv.first);
      continue;
    }
    // A section is a key that prefixes some schema keys.
    auto section = schema.lower_bound(key + ".");
    if (section != schema.end() && section->first.rfind(key + ".", 0) == 0) {
      if (kv.second.IsNull()) continue;  // "section:" with every key in it commented out
      if (!kv.second.IsMap()) {
        return absl::InvalidArgumentError(
            absl::StrCat(Where(source, kv.first), ": ", key, ": expected a mapping (section)"));
      }
      auto status = Walk(config, kv.second, key, source, first_line);
      if (!status.ok()) return status;
      continue;
    }
    return absl::InvalidArgumentError(
        absl::StrCat(Where(source, kv.first), ": unknown key '", key,
                     "' (see the config reference in README.md, or `lorad --print-config-keys`)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ServerConfig> ParseServerConfig(const std::string& yaml_text,
                                               const std::string& source) {
  YAML::Node root;
  try {
    // One document: a second ("---") would otherwise be read by nobody, its keys silently lost.
    std::vector<YAML::Node> documents = YAML::LoadAll(yaml_text);
    // A '---' with nothing after it (a trailing separator) ends no second document.
    while (documents.size() > 1 && documents.back().IsNull()) documents.pop_back();
    if (documents.size() > 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ":", documents[1].Mark().line + 1,
                       ": a second YAML document ('---'); lorad reads one: merge them"));
    }
    if (!documents.empty()) root = documents[0];
  } catch (const YAML::ParserException& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ":", e.mark.line + 1, ": invalid YAML: ", e.msg));
  }
  ServerConfig config;
  if (root.IsNull()) return config;  // an empty file means all defaults
  if (!root.IsMap()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ":1: expected a mapping of sections at the top level"));
  }
  try {
    std::map<std::string, int> first_line;
    auto status = Walk(config, root, "", source, first_line);
    if (!status.ok()) return status;
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ":", e.mark.line + 1, ": ", e.msg));
  }
  return config;
}

absl::StatusOr<ServerConfig> LoadServerConfig(const std::string& path) {
  // Read once, so a pipe serves as well as a file: `--config <(envsubst < lorad.yaml)` keeps
  // secrets (auth.tokens) out of a file on disk, and so does /dev/stdin.
  struct stat st {};
  const bool stream =
      ::stat(path.c_str(), &st) == 0 && (S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode));
  if (!stream) {
    if (auto s = engine::RequireRegularFile(path, absl::StrCat("config file '", path, "'"));
        !s.ok()) {
      return s;
    }
  }
  std::ifstream in(path);
  if (!in) {
    // Most often its mode: a secrets file of mode 0600 owned by another user than lorad's.
    return absl::NotFoundError(absl::StrCat("config file '", path, "' cannot be read (",
                                            std::strerror(errno),
                                            "); make it readable by the user lorad runs as"));
  }
  std::stringstream text;
  text << in.rdbuf();
  return ParseServerConfig(text.str(), path);
}

absl::Status ApplyConfigOverride(ServerConfig& config, const std::string& key,
                                 const std::string& value, const std::string& flag) {
  auto field = Schema().find(key);
  if (field == Schema().end()) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": unknown key '", key, "'"));
  }
  if (auto s = field->second.set(config, YAML::Node(value), flag); !s.ok()) return s;
  config.set_at[key] = flag;
  return absl::OkStatus();
}

absl::StatusOr<std::pair<std::string, int>> SplitHostPort(const std::string& address) {
  const auto colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", address, "' is not host:port (e.g. 127.0.0.1:8080)"));
  }
  std::string host = address.substr(0, colon);
  const bool bracketed = host.size() >= 2 && host.front() == '[' && host.back() == ']';
  if (bracketed) {
    host = host.substr(1, host.size() - 2);
    // Brackets hold an IPv6 address only (gRPC refuses [127.0.0.1] and [localhost], after the
    // model has loaded).
    if (host.find(':') == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "'", address, "': brackets hold an IPv6 address (e.g. [::1]:", address.substr(colon + 1),
          "); write a host name or IPv4 address without them"));
    }
  } else if (host.find(':') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", address, "': put an IPv6 address in brackets (e.g. [::1]:", address.substr(colon + 1),
        ")"));
  }
  for (const char ch : host) {
    // (A bracketed IPv6 address may carry a zone: [fe80::1%eth0].)
    if (!absl::ascii_isalnum(static_cast<unsigned char>(ch)) && ch != '.' && ch != '-' &&
        ch != ':' && ch != '_' && !(bracketed && ch == '%')) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", address, "': '", host, "' is not a host name or IP address"));
    }
  }
  int port = 0;
  const std::string digits = address.substr(colon + 1);  // SimpleAtoi would take "80 " and "+80"
  if (digits.empty() || digits.size() > 5 ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      !absl::SimpleAtoi(digits, &port) || port < 1 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' has no valid port (1..65535)"));
  }
  return std::make_pair(host, port);
}

namespace {

// localhost, 127.0.0.0/8 (127.0.0.2 and the like run instances side by side) and ::1 in any
// spelling: reachable from this machine only.
bool IsLoopbackHost(const std::string& host) {
  if (host == "localhost") return true;
  in_addr v4{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  return inet_pton(AF_INET6, host.c_str(), &v6) == 1 && IN6_IS_ADDR_LOOPBACK(&v6);
}

// Whether two listening addresses surely take the same port: the same host, a wildcard on either
// side, or "localhost" beside the loopback address it names. (Other clashes, two names of one
// interface, are found when the daemon opens the ports, before the model loads.)
bool ListenAddressesOverlap(const std::pair<std::string, int>& a,
                            const std::pair<std::string, int>& b) {
  if (a.second != b.second) return false;
  const auto wildcard = [](const std::string& h) {
    return h.empty() || h == "0.0.0.0" || h == "::" || h == "::0";
  };
  const auto localhost_pair = [](const std::string& x, const std::string& y) {
    return x == "localhost" && (y == "127.0.0.1" || y == "::1");
  };
  return a.first == b.first || wildcard(a.first) || wildcard(b.first) ||
         localhost_pair(a.first, b.first) || localhost_pair(b.first, a.first);
}

}  // namespace

absl::Status ValidateServerConfig(const ServerConfig& config) {
  // "<file:line or flag>: <key>: <message>" for the first of `keys` that was set, else the key.
  auto error = [&](std::initializer_list<const char*> keys, const std::string& message) {
    std::string where;
    for (const char* key : keys) {
      if (auto it = config.set_at.find(key); it != config.set_at.end()) {
        where = it->second + ": ";
        break;
      }
    }
    return absl::InvalidArgumentError(
        absl::StrCat(where, absl::StrJoin(keys, " and "), ": ", message));
  };
  if (config.model.path.empty()) {
    return error({"model.path"},
                 "no model folder given; set it in the config or pass --model PATH");
  }
  for (const auto& [key, value] : {std::pair{"server.grpc_address", &config.server.grpc_address},
                                   std::pair{"server.http_address", &config.server.http_address}}) {
    auto hp = SplitHostPort(*value);
    if (!hp.ok()) return error({key}, std::string(hp.status().message()));
  }
  if (ListenAddressesOverlap(*SplitHostPort(config.server.grpc_address),
                             *SplitHostPort(config.server.http_address))) {
    return error({"server.http_address", "server.grpc_address"},
                 absl::StrCat(config.server.http_address, " takes the port of server.grpc_address ",
                              config.server.grpc_address, "; give them different ports"));
  }
  // Only when both were chosen: the default prompt limit follows a smaller request limit (the
  // daemon takes the smaller of the two).
  if (config.set_at.count("limits.max_prompt_bytes") > 0 &&
      config.limits.max_prompt_bytes > config.server.max_request_bytes) {
    return error(
        {"limits.max_prompt_bytes", "server.max_request_bytes"},
        absl::StrCat("a prompt of limits.max_prompt_bytes (", config.limits.max_prompt_bytes,
                     ") could not arrive in a request of server.max_request_bytes (",
                     config.server.max_request_bytes,
                     "); raise server.max_request_bytes or lower limits.max_prompt_bytes"));
  }
  if (config.storage.data_dir.empty()) return error({"storage.data_dir"}, "must not be empty");
  if (config.server.tls_cert_file.empty() != config.server.tls_key_file.empty()) {
    return error({"server.tls_cert_file", "server.tls_key_file"}, "give both (TLS) or neither");
  }
  if (!config.server.tls_cert_file.empty()) {
    // Read here, before the model loads: gRPC would only fail at listen, as if the port were
    // taken.
    auto pair = ReadTlsPair(config.server.tls_cert_file, config.server.tls_key_file);
    if (auto* problem = std::get_if<TlsFileProblem>(&pair)) {
      return error({problem->key}, problem->message);
    }
  }
  if (config.auth.tokens.empty() && !config.auth.allow_remote_without_tokens) {
    if (!IsLoopbackHost(SplitHostPort(config.server.grpc_address)->first)) {
      return error({"server.grpc_address"},
                   absl::StrCat(config.server.grpc_address,
                                " is reachable from other machines but no auth.tokens are "
                                "configured; add tokens, bind to 127.0.0.1, or set "
                                "auth.allow_remote_without_tokens: true"));
    }
  }
  return absl::OkStatus();
}

namespace {

// "'<path>' can be read by other accounts (mode 644); chmod 600 it" for a file of group or
// other permissions, for `what`; nothing otherwise (or for a pipe: no file holds it).
std::optional<std::string> ReadableByOthers(const std::string& path, const std::string& what) {
  struct stat st {};
  if (path.empty() || ::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode) ||
      (st.st_mode & 0077) == 0) {
    return std::nullopt;
  }
  return absl::StrFormat("%s '%s' can be read by other accounts (mode %o); chmod 600 it", what,
                         path, st.st_mode & 0777);
}

}  // namespace

std::vector<std::string> ServerConfigWarnings(const ServerConfig& config,
                                              const std::string& config_path) {
  std::vector<std::string> warnings;
  const bool tls = !config.server.tls_cert_file.empty();
  const int64_t per_client = config.limits.max_streams_per_client;
  if (per_client > 0 && per_client >= config.limits.max_queued_requests) {
    warnings.push_back(absl::StrCat("limits.max_streams_per_client (", per_client,
                                    ") is not below limits.max_queued_requests (",
                                    config.limits.max_queued_requests,
                                    "): it limits nothing; lower it"));
  } else if (per_client > 0 && config.auth.tokens.empty()) {
    warnings.push_back(absl::StrCat(
        "limits.max_streams_per_client (", per_client,
        ") counts each connection as a client without auth.tokens: a client that opens several "
        "connections gets that many streams on each; give each team a token (auth.tokens) to "
        "limit teams"));
  }
  if (!config.auth.tokens.empty()) {
    if (auto mode = ReadableByOthers(config_path, "the config file, which holds auth.tokens,")) {
      warnings.push_back(*mode);
    }
    const auto host = SplitHostPort(config.server.grpc_address);
    if (!tls && host.ok() && !IsLoopbackHost(host->first)) {
      warnings.push_back(absl::StrCat(
          "server.grpc_address ", config.server.grpc_address,
          " is reachable from other machines without TLS: clients send their auth.tokens in "
          "plain text, readable on the way; set server.tls_cert_file and server.tls_key_file, "
          "or serve behind a TLS proxy"));
    }
  }
  if (!tls) return warnings;
  if (auto mode = ReadableByOthers(config.server.tls_key_file, "server.tls_key_file")) {
    warnings.push_back(*mode);
  }
  auto pair = ReadTlsPair(config.server.tls_cert_file, config.server.tls_key_file);
  if (const auto* read = std::get_if<TlsPair>(&pair)) {
    if (auto date = CertificateDateWarning(
            read->cert_pem,
            absl::StrCat("server.tls_cert_file '", config.server.tls_cert_file, "'"))) {
      warnings.push_back(*std::move(date));
    }
  }
  return warnings;
}

std::vector<ConfigKey> ConfigKeysWithDefaults() {
  std::vector<ConfigKey> keys;
  const ServerConfig defaults;
  for (const auto& [key, field] : Schema()) {
    keys.push_back({key, field.show(defaults), field.accepts});
  }
  return keys;
}

}  // namespace lorad::server
