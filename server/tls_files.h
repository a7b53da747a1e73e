// The TLS certificate and key lorad serves: read from the configured files and checked (PEM, an
// unencrypted key, the certificate's own key), handed to gRPC, and renewed from the files while
// lorad runs, so that a renewed certificate (certbot, cert-manager) needs no restart.
#pragma once

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <variant>

#include "absl/status/statusor.h"

namespace lorad::server {

// A certificate chain and its private key, as PEM text.
struct TlsPair {
  std::string cert_pem;
  std::string key_pem;
  int64_t not_after = 0;  // when the (first) certificate stops being valid, in Unix seconds
};

// What is wrong with the files: the config key of the file at fault, and what to do.
struct TlsFileProblem {
  const char* key;
  std::string message;
};

// Both files read and checked: regular files, a PEM certificate, an unencrypted PEM private key,
// and that key the certificate's.
std::variant<TlsPair, TlsFileProblem> ReadTlsPair(const std::string& cert_path,
                                                  const std::string& key_path);

// A warning when the certificate in `cert_pem` has expired, is not valid yet, or expires within
// 14 days; `file` starts it ("server.tls_cert_file '/etc/lorad/tls.crt'").
std::optional<std::string> CertificateDateWarning(const std::string& cert_pem,
                                                  const std::string& file);

// The pair gRPC serves. Every `reload_every` the files are read again; a pair that differs from
// the served one and checks out is served to new connections from then on (and logged), while
// one that does not (half written, a key of another certificate) leaves the served pair and is
// warned about once. gRPC reads the pair from an in-memory file of this process (a memfd,
// through /proc/self/fd), replaced in one step: gRPC's own file watcher reads the key and the
// certificate one after the other and checks neither, so it could serve a half-renewed pair.
// Where /proc cannot be read (a chroot, a sandbox without it), the pair read at start is served
// as static credentials, not reloaded, with a warning.
class ServedTlsPair {
 public:
  static absl::StatusOr<std::unique_ptr<ServedTlsPair>> Start(const std::string& cert_path,
                                                              const std::string& key_path,
                                                              std::chrono::seconds reload_every);
  ~ServedTlsPair();
  ServedTlsPair(const ServedTlsPair&) = delete;
  ServedTlsPair& operator=(const ServedTlsPair&) = delete;

  // For grpc::ServerBuilder::AddListeningPort.
  std::shared_ptr<grpc::ServerCredentials> Credentials() const;
  // When the served certificate stops being valid (Unix seconds), for the expiry gauge.
  int64_t not_after() const { return not_after_.load(); }

 private:
  enum class Reload { kUnchanged, kRenewed, kRefused };

  ServedTlsPair(std::string cert_path, std::string key_path, int fd, TlsPair pair);
  // The watch thread's step: the files read, and a renewed pair served. `warn`: a pair that
  // does not check out is logged (once for each problem).
  Reload ReloadNow(bool warn);
  void Watch(std::chrono::seconds reload_every);

  const std::string cert_path_;
  const std::string key_path_;
  const int fd_;  // the memfd gRPC reads, at a number that stays; -1: static_pair_
  std::mutex mu_;
  std::string served_;        // cert_pem + key_pem of the served pair
  std::string last_refused_;  // the last problem warned about
  // Served as read at start where gRPC cannot read the memfd (no /proc): not reloaded.
  std::optional<TlsPair> static_pair_;
  std::atomic<int64_t> not_after_;
  // gRPC's reader of the memfd (every second: the pair there is always one lorad checked).
  std::shared_ptr<grpc::experimental::CertificateProviderInterface> provider_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  std::thread watcher_;
};

}  // namespace lorad::server
