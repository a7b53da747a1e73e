// Connection: one gRPC channel to lorad plus the per-call settings every command shares (bearer
// token, deadline) and the one way a failed call is reported.
//
// Thread rules: used from the main thread only; the stubs are thread-safe but nothing else is.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "lorad/v1/adapters.grpc.pb.h"
#include "lorad/v1/inference.grpc.pb.h"
#include "lorad/v1/training.grpc.pb.h"

namespace lorad::cli {

struct ConnectionOptions {
  std::string address = "127.0.0.1:50051";  // host:port
  std::string token;                        // empty = no authorization metadata
  // A file holding the token (read by Create; other accounts see --token in ps). Not with token.
  std::string token_file;
  double timeout_seconds = 0;  // 0 = the CallKind's default deadline
  std::string ca_cert_path;    // non-empty = TLS, trusting this PEM bundle
  // With TLS: the name the server's certificate must carry, when it is not the address's host
  // (an SSH tunnel or port forward to 127.0.0.1, an address by IP).
  std::string tls_server_name;
};

// Unary calls get a deadline even when the user sets none, so a hung daemon never hangs a script;
// calls that read files or wait on requests (submitting a job counts its dataset, loading an
// adapter reads it, unloading waits for its requests) get longer. Streams (generate, chat)
// legitimately run for as long as the reply takes; a watch follows its job for hours and no
// --timeout cuts it (the job would go on while loradctl reported a failure).
constexpr double kDefaultUnaryTimeoutSeconds = 60;
constexpr double kDefaultSlowUnaryTimeoutSeconds = 600;

enum class CallKind { kUnary, kSlowUnary, kStream, kWatch };

// Why `token` cannot travel in a gRPC header (white space or a character outside printable
// ASCII, e.g. a Windows line ending), or "" when it can; `source` names where it came from.
std::string TokenProblem(const std::string& token, const std::string& source);

class Connection {
 public:
  // Fails when the token file or the CA bundle cannot be read or holds no token / certificate;
  // the channel itself connects lazily.
  static absl::StatusOr<std::unique_ptr<Connection>> Create(const ConnectionOptions& options);

  // A fresh context for one call, carrying `authorization: Bearer <token>` and the deadline.
  std::unique_ptr<grpc::ClientContext> NewContext(CallKind kind) const;

  lorad::v1::TrainingService::Stub& training() { return *training_; }
  lorad::v1::InferenceService::Stub& inference() { return *inference_; }
  lorad::v1::AdapterService::Stub& adapters() { return *adapters_; }

  // Prints `loradctl: <CODE>: <message>` to stderr and returns the exit code for `status`.
  // `answered`: the call had a reply before it failed (a stream cut short), so lorad was reached.
  int Fail(const grpc::Status& status, bool answered = false) const;

 private:
  explicit Connection(const ConnectionOptions& options,
                      std::shared_ptr<grpc::ChannelCredentials> credentials);

  ConnectionOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<lorad::v1::TrainingService::Stub> training_;
  std::unique_ptr<lorad::v1::InferenceService::Stub> inference_;
  std::unique_ptr<lorad::v1::AdapterService::Stub> adapters_;
};

}  // namespace lorad::cli
