#include "clients/loradctl/connection.h"

#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "clients/loradctl/exit_codes.h"

namespace lorad::cli {

namespace {

// Replies without gRPC's 4 MiB receive limit: GetJob returns a job's inline examples, which the
// daemon accepts up to server.max_request_bytes (a failed read of a job that exists would only
// mislead).
grpc::ChannelArguments ChannelArgs(const ConnectionOptions& options) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  if (!options.tls_server_name.empty()) {
    args.SetSslTargetNameOverride(options.tls_server_name);
  }
  return args;
}

constexpr char kTokenFileSource[] = "--token-file or LORAD_TOKEN_FILE";

// The token file's content without the line ending an editor or `echo` leaves; a token shared
// with other accounts is warned about, as ssh does for a private key.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read the token file ", path, " (given by ",
                                            kTokenFileSource, "): ", std::strerror(errno)));
  }
  std::stringstream content;
  content << in.rdbuf();
  std::string token(absl::StripAsciiWhitespace(content.str()));
  // A UTF-8 byte order mark, as some editors begin a saved file with.
  if (absl::StartsWith(token, "\xEF\xBB\xBF")) {
    token = std::string(absl::StripAsciiWhitespace(token.substr(3)));
  }
  if (token.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the token file ", path, " (given by ", kTokenFileSource, ") is empty"));
  }
  const std::string problem =
      TokenProblem(token, absl::StrCat("in ", path, " (given by ", kTokenFileSource, ")"));
  if (!problem.empty()) return absl::InvalidArgumentError(problem);
  struct stat info {};
  if (::stat(path.c_str(), &info) == 0 && (info.st_mode & (S_IRGRP | S_IROTH)) != 0) {
    std::cerr << "loradctl: warning: the token file " << path
              << " is readable by other accounts (chmod 600 " << path << ")" << std::endl;
  }
  return token;
}

}  // namespace

std::string TokenProblem(const std::string& token, const std::string& source) {
  for (char c : token) {
    if (c < '!' || c > '~') {
      return absl::StrCat("the token ", source,
                          " has white space or a character outside printable ASCII (a line "
                          "ending from a token file?); a gRPC header cannot carry it");
    }
  }
  return "";
}

absl::StatusOr<std::unique_ptr<Connection>> Connection::Create(const ConnectionOptions& given) {
  ConnectionOptions options = given;
  if (!options.token_file.empty()) {
    if (!options.token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("give a token (--token or LORAD_TOKEN) or a token file (", kTokenFileSource,
                       "), not both: unset the one you do not mean (one on the command "
                       "line wins over the other's environment variable)"));
    }
    absl::StatusOr<std::string> token = ReadTokenFile(options.token_file);
    if (!token.ok()) return token.status();
    options.token = *std::move(token);
  } else if (!options.token.empty()) {
    // A token a gRPC header can carry (printable ASCII): another aborts the client in gRPC, e.g.
    // the line ending of `LORAD_TOKEN=$(cat token.txt)` on a file with Windows line endings.
    // Checked here, not as the option is parsed: an exported one --token-file overrides is not
    // the user's problem. The error names the environment variable, where it may come from.
    const std::string problem = TokenProblem(options.token, "(given by --token or LORAD_TOKEN)");
    if (!problem.empty()) return absl::InvalidArgumentError(problem);
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (options.ca_cert_path.empty() && !options.tls_server_name.empty()) {
    return absl::InvalidArgumentError(
        "--tls-server-name names the certificate of a TLS connection: give --ca-cert too");
  }
  if (options.ca_cert_path.empty()) {
    credentials = grpc::InsecureChannelCredentials();
  } else {
    std::ifstream in(options.ca_cert_path);
    if (!in) {
      return absl::NotFoundError(
          absl::StrCat("cannot read the CA certificate --ca-cert ", options.ca_cert_path));
    }
    std::stringstream pem;
    pem << in.rdbuf();
    // gRPC takes any bytes here and only fails on connecting, with debug lines and "empty
    // address list": say what is wrong with the file instead.
    if (pem.str().find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("--ca-cert ", options.ca_cert_path,
                       ": not a PEM certificate bundle (no '-----BEGIN CERTIFICATE-----' line)"));
    }
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = pem.str();
    credentials = grpc::SslCredentials(ssl);
  }
  return std::unique_ptr<Connection>(new Connection(options, std::move(credentials)));
}

Connection::Connection(const ConnectionOptions& options,
                       std::shared_ptr<grpc::ChannelCredentials> credentials)
    : options_(options),
      channel_(
          grpc::CreateCustomChannel(options.address, std::move(credentials), ChannelArgs(options))),
      training_(lorad::v1::TrainingService::NewStub(channel_)),
      inference_(lorad::v1::InferenceService::NewStub(channel_)),
      adapters_(lorad::v1::AdapterService::NewStub(channel_)) {}

std::unique_ptr<grpc::ClientContext> Connection::NewContext(CallKind kind) const {
  auto context = std::make_unique<grpc::ClientContext>();
  if (!options_.token.empty()) {
    context->AddMetadata("authorization", "Bearer " + options_.token);
  }
  double seconds = kind == CallKind::kWatch ? 0 : options_.timeout_seconds;
  if (seconds <= 0 && kind == CallKind::kUnary) seconds = kDefaultUnaryTimeoutSeconds;
  if (seconds <= 0 && kind == CallKind::kSlowUnary) seconds = kDefaultSlowUnaryTimeoutSeconds;
  if (seconds > 0) {
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
  }
  return context;
}

int Connection::Fail(const grpc::Status& status, bool answered) const {
  std::string message = status.error_message();
  if (message.empty()) {
    // Handlers the daemon registers but has not implemented yet answer with no text at all.
    message = status.error_code() == grpc::StatusCode::UNIMPLEMENTED
                  ? "this lorad does not implement the call yet"
                  : "(the server gave no details)";
  }
  // gRPC's own text for a refused connection never says which address was tried.
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE && answered) {
    message = absl::StrCat("lost the connection to lorad at ", options_.address, " (", message,
                           "); is it still running?");
  } else if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    message = absl::StrCat("cannot reach lorad at ", options_.address, " (", message, ")");
    // A plaintext client at a TLS port sees the server close the socket on its first bytes; a
    // TLS client at a plaintext port reads its answer as a record of a wrong version.
    if (options_.ca_cert_path.empty() &&
        absl::StrContains(status.error_message(), "Socket closed")) {
      absl::StrAppend(&message, "; if lorad serves TLS there, give --ca-cert");
    } else if (!options_.ca_cert_path.empty() &&
               absl::StrContains(status.error_message(), "wrong version number")) {
      absl::StrAppend(&message, "; lorad there serves plaintext: leave out --ca-cert");
    }
  } else if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED) {
    absl::StrAppend(&message, options_.token.empty()
                                  ? " (give --token or --token-file, or set LORAD_TOKEN)"
                                  : " (the token given is not one of the daemon's auth.tokens)");
  } else if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    message = absl::StrCat(message, " (raise --timeout to wait longer)");
  }
  std::cerr << "loradctl: " << GrpcCodeName(status.error_code()) << ": " << message << std::endl;
  return ExitCodeForGrpc(status.error_code());
}

}  // namespace lorad::cli
