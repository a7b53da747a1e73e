#include "server/server_config.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"

namespace lorad::server {
namespace {

TEST(ServerConfig, ShippedDefaultConfigParses) {
  auto c = LoadServerConfig(LORAD_SOURCE_DIR "/deploy/lorad.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->server.grpc_address, "127.0.0.1:50051");
  EXPECT_EQ(c->server.http_address, "127.0.0.1:8080");
  EXPECT_EQ(c->engine.max_prefill_chunk, 0);  // prefill pieces as large as an iteration
  EXPECT_EQ(c->server.keepalive_seconds, ServerConfig{}.server.keepalive_seconds);
  EXPECT_EQ(c->server.keepalive_timeout_seconds, ServerConfig{}.server.keepalive_timeout_seconds);
}

TEST(ServerConfig, KeepaliveOfZeroIsRefused) {  // gRPC would take 0 as "ping without pause"
  auto c = ParseServerConfig("server:\n  keepalive_seconds: 0\n", "k.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("server.keepalive_seconds"), std::string::npos);
  EXPECT_NE(c.status().message().find("out of range"), std::string::npos) << c.status();
}

TEST(ServerConfig, UnknownKeyNamesKeyAndLine) {
  auto c = ParseServerConfig("server:\n  grpc_address: 127.0.0.1:1\n  grcp_port: 5\n", "a.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().message().substr(0, 9), "a.yaml:3:");
  EXPECT_NE(c.status().message().find("server.grcp_port"), std::string::npos);
}

TEST(ServerConfig, WrongTypeNamesKeyAndLine) {
  auto c =
      ParseServerConfig("logging:\n  level: info\nserver:\n  max_request_bytes: lots\n", "b.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("b.yaml:4"), std::string::npos);
  EXPECT_NE(c.status().message().find("server.max_request_bytes"), std::string::npos);
  EXPECT_NE(c.status().message().find("integer"), std::string::npos);
}

// A shell's ~ and $VARIABLE are not expanded (no shell reads the file): refused in a path,
// naming the line, rather than taken as a folder named '~' in the working directory.
TEST(ServerConfig, AShellsTildeOrVariableInAPathIsRefused) {
  for (const auto& [yaml, line] : std::vector<std::pair<std::string, std::string>>{
           {"storage:\n  data_dir: ~/lorad-data\n", "p.yaml:2: storage.data_dir: '~/lorad-data'"},
           {"model:\n  path: $HOME/models/x\n", "p.yaml:2: model.path: '$HOME/models/x'"},
           {"storage:\n  dataset_root: /srv/${USER}/ds\n", "p.yaml:2: storage.dataset_root"}}) {
    auto c = ParseServerConfig(yaml, "p.yaml");
    ASSERT_FALSE(c.ok()) << yaml;
    EXPECT_TRUE(absl::StartsWith(c.status().message(), line)) << c.status();
    EXPECT_NE(c.status().message().find("does not expand"), std::string::npos) << c.status();
  }
  auto plain = ParseServerConfig("storage:\n  data_dir: /srv/a~b$1\n", "p.yaml");
  EXPECT_TRUE(plain.ok()) << plain.status();
}

TEST(ServerConfig, OutOfRangeNamesTheRange) {
  auto c = ParseServerConfig("server:\n  max_request_bytes: 10\n", "c.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("out of range"), std::string::npos);
}

TEST(ServerConfig, EnumValuesAreChecked) {
  auto c = ParseServerConfig("model:\n  device: tpu\n", "d.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("auto, cpu, cuda"), std::string::npos);
}

TEST(ServerConfig, SectionMustBeAMapping) {
  auto c = ParseServerConfig("server: 5\n", "e.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("e.yaml:1"), std::string::npos);
}

TEST(ServerConfig, InvalidYamlIsReportedWithLine) {
  auto c = ParseServerConfig("server:\n  grpc_address: [1, 2\n", "f.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("f.yaml:"), std::string::npos);
}

TEST(ServerConfig, AKeyOrSectionSetTwiceIsAnError) {
  auto key = ParseServerConfig("limits:\n  max_queued_jobs: 1\n  max_queued_jobs: 3\n", "g.yaml");
  ASSERT_FALSE(key.ok());
  EXPECT_EQ(key.status().message().substr(0, 9), "g.yaml:3:") << key.status();
  EXPECT_NE(key.status().message().find("limits.max_queued_jobs' is set twice (also at line 2)"),
            std::string::npos)
      << key.status();
  auto section =
      ParseServerConfig("limits:\n  max_queued_jobs: 1\nlimits:\n  max_new_tokens: 9\n", "h.yaml");
  ASSERT_FALSE(section.ok());
  EXPECT_NE(section.status().message().find("h.yaml:3"), std::string::npos) << section.status();
}

TEST(ServerConfig, AConfigPathThatIsNotAFileIsAnError) {
  auto folder = LoadServerConfig(LORAD_SOURCE_DIR "/deploy");
  ASSERT_FALSE(folder.ok());
  EXPECT_NE(folder.status().message().find("is a directory"), std::string::npos) << folder.status();
  EXPECT_EQ(LoadServerConfig("/no/such/lorad.yaml").status().code(), absl::StatusCode::kNotFound);
}

// A pipe is read as the file it carries (`--config <(envsubst < lorad.yaml)`, /dev/stdin):
// secrets need not be written to disk.
TEST(ServerConfig, AConfigFromAPipeIsRead) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const std::string yaml = "server:\n  grpc_address: 127.0.0.1:7\n";
  ASSERT_EQ(::write(fds[1], yaml.data(), yaml.size()), static_cast<ssize_t>(yaml.size()));
  ::close(fds[1]);
  auto piped = LoadServerConfig("/proc/self/fd/" + std::to_string(fds[0]));
  ::close(fds[0]);
  ASSERT_TRUE(piped.ok()) << piped.status();
  EXPECT_EQ(piped->server.grpc_address, "127.0.0.1:7");
}

TEST(ServerConfig, FlagsOverrideWithTheSameRules) {
  ServerConfig c;
  ASSERT_TRUE(ApplyConfigOverride(c, "model.path", "/m", "--model").ok());
  EXPECT_EQ(c.model.path, "/m");
  auto bad = ApplyConfigOverride(c, "model.device", "gpu", "--device");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("--device"), std::string::npos);
}

TEST(ServerConfig, ValidationRequiresModelAndSaneAddresses) {
  ServerConfig c;
  EXPECT_NE(ValidateServerConfig(c).message().find("model.path"), std::string::npos);
  c.model.path = "/m";
  EXPECT_TRUE(ValidateServerConfig(c).ok());
  c.server.http_address = "localhost";
  EXPECT_NE(ValidateServerConfig(c).message().find("server.http_address"), std::string::npos);
  c.server.http_address = "[::1]:70000";
  EXPECT_FALSE(ValidateServerConfig(c).ok());
}

// Errors about a key that only validation can see (or about two keys together) point at the line
// or the flag that set it.
TEST(ServerConfig, ValidationErrorsNameTheFileLineOrFlag) {
  auto c = ParseServerConfig(
      "model:\n  path: /m\nserver:\n  grpc_address: 127.0.0.1:1\n  tls_key_file: key.pem\n",
      "lorad.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  auto tls = ValidateServerConfig(*c);
  ASSERT_FALSE(tls.ok());
  EXPECT_EQ(tls.message().rfind("lorad.yaml:5: server.tls_cert_file and server.tls_key_file", 0),
            0u)
      << tls;
  c->server.tls_key_file.clear();
  ASSERT_TRUE(ApplyConfigOverride(*c, "server.grpc_address", "0.0.0.0:1", "--grpc-address").ok());
  auto remote = ValidateServerConfig(*c);
  ASSERT_FALSE(remote.ok());
  EXPECT_EQ(remote.message().rfind("--grpc-address: server.grpc_address: 0.0.0.0:1", 0), 0u)
      << remote;
  // Every loopback spelling serves without tokens (127.0.0.2 was called reachable from other
  // machines); an address of the machine's network does not.
  for (const char* loopback : {"127.0.0.1:1", "127.0.0.2:1", "127.255.0.9:1", "localhost:1",
                               "[::1]:1", "[0:0:0:0:0:0:0:1]:1"}) {
    ASSERT_TRUE(ApplyConfigOverride(*c, "server.grpc_address", loopback, "--grpc-address").ok());
    EXPECT_TRUE(ValidateServerConfig(*c).ok()) << loopback << ": " << ValidateServerConfig(*c);
  }
  for (const char* remote_address : {"128.0.0.1:1", "10.1.2.3:1", "[::2]:1"}) {
    ASSERT_TRUE(
        ApplyConfigOverride(*c, "server.grpc_address", remote_address, "--grpc-address").ok());
    EXPECT_FALSE(ValidateServerConfig(*c).ok()) << remote_address;
  }
  ASSERT_TRUE(ApplyConfigOverride(*c, "server.grpc_address", "0.0.0.0:1", "--grpc-address").ok());
  ASSERT_TRUE(ApplyConfigOverride(*c, "server.http_address", "localhost", "--http-address").ok());
  EXPECT_EQ(ValidateServerConfig(*c).message().rfind("--http-address: server.http_address", 0), 0u);
}

TEST(ServerConfig, ASecondYamlDocumentIsAnError) {
  auto c = ParseServerConfig(
      "engine:\n  max_running_requests: 2\n---\nengine:\n"
      "  max_running_requests: 3\n",
      "lorad.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("lorad.yaml:4: a second YAML document"), std::string::npos)
      << c.status();
  EXPECT_TRUE(ParseServerConfig("---\nengine:\n  max_running_requests: 2\n", "f").ok());
  // A trailing separator ends no second document.
  auto trailing = ParseServerConfig("engine:\n  max_running_requests: 2\n---\n", "f");
  ASSERT_TRUE(trailing.ok()) << trailing.status();
  EXPECT_EQ(trailing->engine.max_running_requests, 2);
}

// YAML's capitalised booleans (True, FALSE), as loradctl's job files take them.
TEST(ServerConfig, CapitalisedBooleansAreRead) {
  auto c = ParseServerConfig("engine:\n  cuda_graphs: False\n", "f");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->engine.cuda_graphs);
  c = ParseServerConfig("engine:\n  cuda_graphs: TRUE\n", "f");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->engine.cuda_graphs);
}

TEST(ServerConfig, SplitHostPortHandlesIpv6) {
  auto hp = SplitHostPort("[::1]:8080");
  ASSERT_TRUE(hp.ok());
  EXPECT_EQ(hp->first, "::1");
  EXPECT_EQ(hp->second, 8080);
}

// A key may be written dotted in the file too; one that repeats a key written inside its
// section is set twice, as two keys inside the section are.
TEST(ServerConfig, ADottedKeyIsReadAndCountsForTheSetTwiceCheck) {
  auto dotted = ParseServerConfig("engine.kv_cache_bytes: 2097152\n", "d.yaml");
  ASSERT_TRUE(dotted.ok()) << dotted.status();
  EXPECT_EQ(dotted->engine.kv_cache_bytes, 2097152);
  auto twice = ParseServerConfig(
      "server:\n  grpc_address: 127.0.0.1:18051\nserver.grpc_address: 127.0.0.1:18052\n", "d.yaml");
  ASSERT_FALSE(twice.ok());
  EXPECT_NE(twice.status().message().find(
                "d.yaml:3: 'server.grpc_address' is set twice (also at line 2)"),
            std::string::npos)
      << twice.status();
}

// "auth:" with every key in it commented out keeps the section's defaults, as "key:" does.
TEST(ServerConfig, ASectionLeftEmptyKeepsItsDefaults) {
  auto c = ParseServerConfig("auth:\n  # tokens: []\nlimits:\n  max_queued_jobs: 7\n", "e.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->auth.tokens.empty());
  EXPECT_EQ(c->auth.allow_remote_without_tokens, ServerConfig{}.auth.allow_remote_without_tokens);
  EXPECT_EQ(c->limits.max_queued_jobs, 7);
}

TEST(ServerConfig, ATokenEntryWithAKeyTwiceOrNoTokenIsRefused) {
  auto twice = ParseServerConfig(
      "auth:\n  tokens:\n    - {name: a, role: admin, token: aaaaaaaaaaaaaaaa, token: "
      "bbbbbbbbbbbbbbbb}\n",
      "t.yaml");
  ASSERT_FALSE(twice.ok());
  EXPECT_NE(twice.status().message().find("t.yaml:3: auth.tokens[0].token: set twice"),
            std::string::npos)
      << twice.status();
  auto none = ParseServerConfig("auth:\n  tokens:\n    - {name: a, role: admin}\n", "t.yaml");
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("auth.tokens[0]: no token"), std::string::npos)
      << none.status();
}

TEST(ServerConfig, AnIntegerTooLargeIsOutOfRange) {
  auto c = ParseServerConfig("limits:\n  max_queued_jobs: 99999999999999999999999\n", "i.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("limits.max_queued_jobs: 99999999999999999999999 is out of "
                                      "range [1, 100000]"),
            std::string::npos)
      << c.status();
}

// Refused before the model loads: addresses gRPC or the HTTP server could not listen on, two
// addresses on one port, and a prompt limit no request could carry.
TEST(ServerConfig, AddressesThatCannotBothListenAreRefused) {
  EXPECT_FALSE(SplitHostPort("::1:18051").ok());  // IPv6 needs brackets
  EXPECT_NE(SplitHostPort("::1:18051").status().message().find("[::1]:18051"), std::string::npos);
  EXPECT_FALSE(SplitHostPort("no such host:18051").ok());
  EXPECT_TRUE(SplitHostPort("my-host.example_1:18051").ok());
  EXPECT_TRUE(SplitHostPort("[fe80::fc:ff:fe00:1%eth0]:18051").ok());  // a zone, as gRPC takes
  // What gRPC cannot parse (found only after the model had loaded): a port with a space or a
  // sign, brackets around what is not an IPv6 address.
  for (const char* address : {"127.0.0.1:18051 ", "127.0.0.1: 18051", "127.0.0.1:+18051",
                              "[127.0.0.1]:18051", "[localhost]:18051", "[]:18051"}) {
    EXPECT_FALSE(SplitHostPort(address).ok()) << "'" << address << "'";
  }

  ServerConfig c;
  c.model.path = "/m";
  const std::vector<std::pair<std::string, std::string>> overlapping = {
      {"127.0.0.1:18051", "localhost:18051"},
      {"127.0.0.1:18051", "0.0.0.0:18051"},
      {"[::]:18051", "127.0.0.1:18051"},
      {"127.0.0.1:18051", "127.0.0.1:18051"},
  };
  for (const auto& [grpc, http] : overlapping) {
    c.server.grpc_address = grpc;
    c.server.http_address = http;
    const absl::Status s = ValidateServerConfig(c);
    ASSERT_FALSE(s.ok()) << grpc << " " << http;
    EXPECT_NE(s.message().find("give them different ports"), std::string::npos) << s;
  }
  // The clash named where it was made, whichever of the two was set in the file.
  c.server.grpc_address = "127.0.0.1:8080";
  c.server.http_address = "127.0.0.1:8080";
  c.set_at["server.grpc_address"] = "lorad.yaml:4";
  EXPECT_TRUE(absl::StartsWith(ValidateServerConfig(c).message(), "lorad.yaml:4: "))
      << ValidateServerConfig(c);
  c.set_at.clear();
  // Different interfaces on one port can both listen (the start-up probe finds real clashes).
  for (const char* http : {"[::1]:18051", "127.0.0.2:18051", "localhost:18052"}) {
    c.server.grpc_address = "127.0.0.1:18051";
    c.server.http_address = http;
    EXPECT_TRUE(ValidateServerConfig(c).ok()) << http;
  }

  // The default prompt limit follows a smaller request limit; both chosen, they must agree.
  c.server.max_request_bytes = 256 << 10;
  EXPECT_TRUE(ValidateServerConfig(c).ok());
  c.server.max_request_bytes = 4 << 20;
  ASSERT_TRUE(ApplyConfigOverride(c, "limits.max_prompt_bytes", "8388608", "--set").ok());
  const absl::Status prompt = ValidateServerConfig(c);
  ASSERT_FALSE(prompt.ok());
  EXPECT_NE(prompt.message().find("raise server.max_request_bytes"), std::string::npos) << prompt;
  c.server.max_request_bytes = 9 << 20;
  EXPECT_TRUE(ValidateServerConfig(c).ok());
}

// A self-signed certificate valid from `from_days` to `to_days` from now, and its key, as PEM.
bool WriteSelfSignedCertificate(const std::string& cert_path, const std::string& key_path,
                                long from_days, long to_days) {
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(EVP_RSA_gen(2048), &EVP_PKEY_free);
  std::unique_ptr<X509, decltype(&X509_free)> cert(X509_new(), &X509_free);
  if (!key || !cert) return false;
  X509_set_version(cert.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 1);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), from_days * 24 * 3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), to_days * 24 * 3600);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("lorad-test"), -1, -1, 0);
  X509_set_issuer_name(cert.get(), name);
  X509_set_pubkey(cert.get(), key.get());
  if (X509_sign(cert.get(), key.get(), EVP_sha256()) == 0) return false;
  FILE* c = std::fopen(cert_path.c_str(), "w");
  FILE* k = std::fopen(key_path.c_str(), "w");
  const bool written =
      c != nullptr && k != nullptr && PEM_write_X509(c, cert.get()) == 1 &&
      PEM_write_PrivateKey(k, key.get(), nullptr, nullptr, 0, nullptr, nullptr) == 1;
  if (c != nullptr) std::fclose(c);
  if (k != nullptr) std::fclose(k);
  return written;
}

// A value of the wrong shape under auth.tokens may be a token itself: errors (which go to the
// log) do not quote it.
TEST(ServerConfig, AMisshapedTokenValueIsNotQuoted) {
  for (const std::string yaml : {"auth:\n  tokens: SECRETsecretSECRET3\n",
                                 "auth:\n  tokens:\n    - SECRETsecretSECRET3\n"}) {
    auto c = ParseServerConfig(yaml, "t.yaml");
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.status().message().find("SECRET"), std::string::npos) << c.status();
    EXPECT_NE(c.status().message().find("not shown: it may be a token"), std::string::npos)
        << c.status();
  }
}

// What a valid config leaves exposed is said at start-up: tokens in plain text to an address
// other machines reach, a config file holding tokens or a TLS key that other accounts can read,
// a certificate past its end.
TEST(ServerConfig, WarningsNameTokensInPlainTextReadableSecretsAndAnExpiredCertificate) {
  const std::string dir = ::testing::TempDir() + "/server_config_warnings";
  ASSERT_EQ(std::system(("rm -rf " + dir + " && mkdir -p " + dir).c_str()), 0);
  const std::string yaml = dir + "/lorad.yaml";
  FILE* f = std::fopen(yaml.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fputs("auth:\n  tokens:\n    - {name: ops, role: admin, token: aaaaaaaaaaaaaaaa}\n", f);
  std::fclose(f);
  ASSERT_EQ(::chmod(yaml.c_str(), 0644), 0);
  auto c = LoadServerConfig(yaml);
  ASSERT_TRUE(c.ok()) << c.status();
  c->server.grpc_address = "0.0.0.0:50051";
  const auto joined = [](const std::vector<std::string>& lines) {
    std::string all;
    for (const auto& l : lines) all += l + "\n";
    return all;
  };
  std::string said = joined(ServerConfigWarnings(*c, yaml));
  EXPECT_NE(said.find("the config file, which holds auth.tokens, '" + yaml +
                      "' can be read by other accounts (mode 644); chmod 600 it"),
            std::string::npos)
      << said;
  EXPECT_NE(said.find("server.grpc_address 0.0.0.0:50051 is reachable from other machines "
                      "without TLS"),
            std::string::npos)
      << said;
  ASSERT_EQ(::chmod(yaml.c_str(), 0600), 0);
  c->server.grpc_address = "127.0.0.1:50051";
  EXPECT_EQ(joined(ServerConfigWarnings(*c, yaml)), "");

  // A certificate that ended a year ago, its key of mode 0644; then one that ends tomorrow.
  const std::string cert = dir + "/old.crt", key = dir + "/old.key";
  ASSERT_TRUE(WriteSelfSignedCertificate(cert, key, -730, -365));
  ASSERT_EQ(::chmod(key.c_str(), 0644), 0);
  c->server.tls_cert_file = cert;
  c->server.tls_key_file = key;
  said = joined(ServerConfigWarnings(*c, yaml));
  EXPECT_NE(said.find("server.tls_key_file '" + key + "' can be read by other accounts"),
            std::string::npos)
      << said;
  EXPECT_NE(said.find("the certificate expired on "), std::string::npos) << said;
  EXPECT_NE(said.find("certificate verify failed"), std::string::npos) << said;
  ASSERT_TRUE(WriteSelfSignedCertificate(cert, key, -1, 1));
  said = joined(ServerConfigWarnings(*c, yaml));
  EXPECT_NE(said.find("the certificate expires on "), std::string::npos) << said;
}

// limits.max_streams_per_client where it cannot do what it is set for: without tokens a client
// is a connection (one that opens several gets that many places on each), and at or above
// limits.max_queued_requests it never refuses anything.
TEST(ServerConfig, WarningsSayWhereAPerClientStreamLimitDoesNotLimitClients) {
  ServerConfig c;
  EXPECT_TRUE(ServerConfigWarnings(c, "").empty());
  c.limits.max_streams_per_client = 8;
  auto said = ServerConfigWarnings(c, "");
  ASSERT_EQ(said.size(), 1u);
  EXPECT_EQ(said[0],
            "limits.max_streams_per_client (8) counts each connection as a client without "
            "auth.tokens: a client that opens several connections gets that many streams on "
            "each; give each team a token (auth.tokens) to limit teams");
  c.auth.tokens.push_back({"team-a", "user", "aaaaaaaaaaaaaaaa", ""});
  EXPECT_TRUE(ServerConfigWarnings(c, "").empty());
  c.limits.max_streams_per_client = c.limits.max_queued_requests;
  said = ServerConfigWarnings(c, "");
  ASSERT_EQ(said.size(), 1u);
  EXPECT_EQ(said[0],
            "limits.max_streams_per_client (1024) is not below limits.max_queued_requests (1024): "
            "it limits nothing; lower it");
}

}  // namespace
}  // namespace lorad::server
