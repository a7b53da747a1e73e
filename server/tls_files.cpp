#include "server/tls_files.h"

#include <fcntl.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "engine/runtime/durable_file.h"

namespace lorad::server {
namespace {

constexpr const char* kCertKey = "server.tls_cert_file";
constexpr const char* kKeyKey = "server.tls_key_file";

// How long after a refused read the files are read once more before it is warned about: a
// renewal that replaces the two files one after the other is seen half done.
constexpr std::chrono::seconds kRereadAfterRefusal{2};

// How often gRPC reads the in-memory file: it holds what lorad checked, so this only bounds how
// long a renewed pair waits to be served.
constexpr unsigned int kGrpcReadSeconds = 1;

using Bio = std::unique_ptr<BIO, decltype(&BIO_free)>;
using Certificate = std::unique_ptr<X509, decltype(&X509_free)>;

Bio MemoryBio(const std::string& text) {
  return Bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())), &BIO_free);
}

// The first certificate of PEM text; null when it holds none.
Certificate FirstCertificate(const std::string& pem) {
  Bio bio = MemoryBio(pem);
  return Certificate(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr,
                     &X509_free);
}

// Whether every PEM certificate after the first in `pem` reads to its end: a chain file cut off
// (a copy in place, half done) passes the first certificate's checks and fails every handshake.
bool WholeChainReads(const std::string& pem) {
  Bio bio = MemoryBio(pem);
  if (!bio) return false;
  ERR_clear_error();
  int certificates = 0;
  while (X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    X509_free(cert);
    ++certificates;
  }
  // The loop ends at the text's end (no further BEGIN line), or at a block that does not read.
  const unsigned long error = ERR_peek_last_error();
  const bool at_end = certificates > 0 && ERR_GET_LIB(error) == ERR_LIB_PEM &&
                      ERR_GET_REASON(error) == PEM_R_NO_START_LINE;
  ERR_clear_error();
  return at_end;
}

std::string Date(const ASN1_TIME* t) {
  std::tm tm{};
  char text[32] = "?";
  if (ASN1_TIME_to_tm(t, &tm) == 1) std::strftime(text, sizeof(text), "%Y-%m-%d %H:%M UTC", &tm);
  return text;
}

std::optional<int64_t> NotAfter(const X509* cert) {
  // The difference from the epoch, as ASN1_TIME_diff gives it (no time zone involved).
  ASN1_TIME* epoch = ASN1_TIME_set(nullptr, 0);
  int days = 0, seconds = 0;
  const bool ok =
      epoch != nullptr && ASN1_TIME_diff(&days, &seconds, epoch, X509_get0_notAfter(cert)) == 1;
  ASN1_TIME_free(epoch);
  if (!ok) return std::nullopt;
  return int64_t{days} * 86400 + seconds;
}

std::string UnixDate(int64_t seconds) {
  ASN1_TIME* t = ASN1_TIME_set(nullptr, static_cast<time_t>(seconds));
  std::string text = t ? Date(t) : "?";
  ASN1_TIME_free(t);
  return text;
}

// What the in-memory file holds: the key first, then the chain (gRPC reads both from it, each
// reader skipping the other's PEM blocks).
std::string PairText(const TlsPair& pair) {
  return absl::StrCat(pair.key_pem, "\n", pair.cert_pem);
}

std::string ProcPath(int fd) { return absl::StrCat("/proc/self/fd/", fd); }

// Whether gRPC can read the in-memory file by its /proc path: not where /proc is not mounted or
// is masked (a chroot, a sandbox without it, systemd's InaccessiblePaths=/proc). "" when it can,
// else why not.
std::string UnreadableThroughProc(int fd, const std::string& expected) {
  const std::string path = ProcPath(fd);
  const int in = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) return absl::StrCat(path, ": ", std::strerror(errno));
  std::string text(expected.size() + 1, '\0');
  size_t done = 0;
  ssize_t n = 0;
  while (done < text.size() && (n = read(in, text.data() + done, text.size() - done)) > 0) {
    done += static_cast<size_t>(n);
  }
  close(in);
  text.resize(done);
  return text == expected ? "" : absl::StrCat(path, " does not read back what was written");
}

// An in-memory file holding PairText(pair), modified at `mtime`.
absl::StatusOr<int> PairInMemory(const TlsPair& pair, time_t mtime) {
  const int fd = memfd_create("lorad-tls", MFD_CLOEXEC);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("TLS: cannot make an in-memory file for the certificate (memfd_create: ",
                     std::strerror(errno), ")"));
  }
  const std::string text = PairText(pair);
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      close(fd);
      return absl::UnavailableError(
          absl::StrCat("TLS: cannot write the in-memory certificate file: ", std::strerror(err)));
    }
    done += static_cast<size_t>(n);
  }
  const timespec times[2] = {{mtime, 0}, {mtime, 0}};
  futimens(fd, times);
  return fd;
}

}  // namespace

std::variant<TlsPair, TlsFileProblem> ReadTlsPair(const std::string& cert_path,
                                                  const std::string& key_path) {
  TlsPair pair;
  for (const auto& [key, path, text] : {std::tuple{kCertKey, &cert_path, &pair.cert_pem},
                                        std::tuple{kKeyKey, &key_path, &pair.key_pem}}) {
    auto read = engine::ReadRegularFile(*path, absl::StrCat("'", *path, "'"));
    if (!read.ok()) return TlsFileProblem{key, std::string(read.status().message())};
    *text = *std::move(read);
  }
  const Certificate cert = FirstCertificate(pair.cert_pem);
  if (!cert) {
    return TlsFileProblem{kCertKey,
                          absl::StrCat("'", cert_path, "' cannot be read as a PEM certificate")};
  }
  if (!WholeChainReads(pair.cert_pem)) {
    return TlsFileProblem{
        kCertKey, absl::StrCat("'", cert_path,
                               "': a certificate after the first cannot be read (a chain file cut "
                               "off or damaged; replace the files whole, by a rename)")};
  }
  Bio key_bio = MemoryBio(pair.key_pem);
  // An empty passphrase callback: an encrypted key fails here instead of prompting.
  auto no_passphrase = [](char*, int, int, void*) { return 0; };
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(
      key_bio ? PEM_read_bio_PrivateKey(key_bio.get(), nullptr, no_passphrase, nullptr) : nullptr,
      &EVP_PKEY_free);
  if (!key) {
    return TlsFileProblem{
        kKeyKey, absl::StrCat("'", key_path,
                              "' cannot be read as an unencrypted PEM private key (remove a "
                              "passphrase first)")};
  }
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    return TlsFileProblem{
        kKeyKey,
        absl::StrCat("'", key_path, "' is not the key of the certificate in '", cert_path, "'")};
  }
  const auto not_after = NotAfter(cert.get());
  if (!not_after) {
    return TlsFileProblem{
        kCertKey, absl::StrCat("'", cert_path, "': the certificate's end date cannot be read")};
  }
  pair.not_after = *not_after;
  return pair;
}

std::optional<std::string> CertificateDateWarning(const std::string& cert_pem,
                                                  const std::string& file) {
  const Certificate cert = FirstCertificate(cert_pem);
  if (!cert) return std::nullopt;
  const ASN1_TIME* not_after = X509_get0_notAfter(cert.get());
  const ASN1_TIME* not_before = X509_get0_notBefore(cert.get());
  const std::string clients_refuse =
      "clients refuse the connection (\"certificate verify failed\"); renew it";
  std::time_t in_14_days = std::time(nullptr) + 14 * 24 * 3600;
  if (X509_cmp_current_time(not_after) <= 0) {
    return absl::StrCat(file, ": the certificate expired on ", Date(not_after), ": ",
                        clients_refuse);
  }
  if (X509_cmp_current_time(not_before) >= 0) {
    return absl::StrCat(file, ": the certificate is not valid before ", Date(not_before), ": ",
                        clients_refuse);
  }
  if (X509_cmp_time(not_after, &in_14_days) <= 0) {
    return absl::StrCat(file, ": the certificate expires on ", Date(not_after),
                        "; renew it before then");
  }
  return std::nullopt;
}

absl::StatusOr<std::unique_ptr<ServedTlsPair>> ServedTlsPair::Start(
    const std::string& cert_path, const std::string& key_path, std::chrono::seconds reload_every) {
  auto read = ReadTlsPair(cert_path, key_path);
  if (auto* problem = std::get_if<TlsFileProblem>(&read)) {
    return absl::InvalidArgumentError(absl::StrCat(problem->key, ": ", problem->message));
  }
  TlsPair pair = std::get<TlsPair>(std::move(read));
  // Where gRPC cannot read the pair from memory, it is served as read now (static credentials),
  // not reloaded: every handshake failed there while lorad said it served.
  int fd = -1;
  std::string why_static;
  if (auto in_memory = PairInMemory(pair, std::time(nullptr)); !in_memory.ok()) {
    why_static = std::string(in_memory.status().message());
  } else if (why_static = UnreadableThroughProc(*in_memory, PairText(pair)); !why_static.empty()) {
    close(*in_memory);
  } else {
    fd = *in_memory;
  }
  if (fd < 0) {
    spdlog::warn(
        "TLS: the certificate is served as read at start and not reloaded ({}); restart lorad "
        "to serve a renewed one",
        why_static);
  }
  std::unique_ptr<ServedTlsPair> served(
      new ServedTlsPair(cert_path, key_path, fd, std::move(pair)));
  if (fd >= 0) {
    served->watcher_ = std::thread([s = served.get(), reload_every] { s->Watch(reload_every); });
  }
  return served;
}

ServedTlsPair::ServedTlsPair(std::string cert_path, std::string key_path, int fd, TlsPair pair)
    : cert_path_(std::move(cert_path)),
      key_path_(std::move(key_path)),
      fd_(fd),
      served_(pair.cert_pem + pair.key_pem),
      static_pair_(fd < 0 ? std::optional<TlsPair>(pair) : std::nullopt),
      not_after_(pair.not_after) {
  if (fd >= 0) {
    provider_ = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
        ProcPath(fd), ProcPath(fd), kGrpcReadSeconds);
  }
}

ServedTlsPair::~ServedTlsPair() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (watcher_.joinable()) watcher_.join();
  provider_.reset();  // its thread reads fd_
  if (fd_ >= 0) close(fd_);
}

std::shared_ptr<grpc::ServerCredentials> ServedTlsPair::Credentials() const {
  if (static_pair_) {
    grpc::SslServerCredentialsOptions options;
    options.pem_key_cert_pairs.push_back({static_pair_->key_pem, static_pair_->cert_pem});
    return grpc::SslServerCredentials(options);
  }
  grpc::experimental::TlsServerCredentialsOptions options(provider_);
  options.watch_identity_key_cert_pairs();
  return grpc::experimental::TlsServerCredentials(options);
}

ServedTlsPair::Reload ServedTlsPair::ReloadNow(bool warn) {
  auto read = ReadTlsPair(cert_path_, key_path_);
  std::lock_guard<std::mutex> lock(mu_);
  if (auto* problem = std::get_if<TlsFileProblem>(&read)) {
    if (warn && problem->message != last_refused_) {
      spdlog::warn("{}: {}; still serving the certificate read before (valid until {})",
                   problem->key, problem->message, UnixDate(not_after_.load()));
    }
    if (warn) last_refused_ = problem->message;
    return Reload::kRefused;
  }
  const TlsPair& pair = std::get<TlsPair>(read);
  if (pair.cert_pem + pair.key_pem == served_) {
    last_refused_.clear();  // back to the served pair: a problem seen again is new
    return Reload::kUnchanged;
  }
  // Modified later than the file it replaces, by a second at least (gRPC compares the times, in
  // seconds, before and after its reads to tell a read across the swap).
  struct stat old {};
  const time_t mtime =
      std::max(std::time(nullptr), fstat(fd_, &old) == 0 ? old.st_mtime + 1 : time_t{0});
  auto fd = PairInMemory(pair, mtime);
  if (!fd.ok()) {
    spdlog::warn("{}; still serving the certificate read before",
                 std::string(fd.status().message()));
    return Reload::kRefused;
  }
  // One step: gRPC opens the old file or the new one, never neither (and, as dup2 would not,
  // close-on-exec stays: no process lorad might start inherits the key).
  dup3(*fd, fd_, O_CLOEXEC);
  close(*fd);
  served_ = pair.cert_pem + pair.key_pem;
  last_refused_.clear();
  not_after_ = pair.not_after;
  spdlog::info("{} '{}' renewed: new connections get the certificate valid until {}", kCertKey,
               cert_path_, UnixDate(pair.not_after));
  if (auto warning =
          CertificateDateWarning(pair.cert_pem, absl::StrCat(kCertKey, " '", cert_path_, "'"))) {
    spdlog::warn("{}", *warning);
  }
  return Reload::kRenewed;
}

void ServedTlsPair::Watch(std::chrono::seconds reload_every) {
  const auto wait = [this](std::chrono::seconds d) {
    std::unique_lock<std::mutex> lock(mu_);
    return !stop_cv_.wait_for(lock, d, [this] { return stopping_; });
  };
  while (wait(reload_every)) {
    if (ReloadNow(/*warn=*/false) == Reload::kRefused && wait(kRereadAfterRefusal)) {
      ReloadNow(/*warn=*/true);
    }
  }
}

}  // namespace lorad::server
