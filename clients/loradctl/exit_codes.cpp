#include "clients/loradctl/exit_codes.h"

#include "absl/strings/str_cat.h"

namespace lorad::cli {

namespace {

// Indexed by grpc::StatusCode (0..16); the values are fixed by the gRPC spec.
constexpr const char* kCodeNames[] = {
    "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED"};
constexpr int kCodeCount = sizeof(kCodeNames) / sizeof(kCodeNames[0]);

}  // namespace

std::string GrpcCodeName(grpc::StatusCode code) {
  const int value = static_cast<int>(code);
  if (value >= 0 && value < kCodeCount) return kCodeNames[value];
  return absl::StrCat("CODE_", value);
}

std::string ExitCodesHelp() {
  std::string text = absl::StrCat(
      "Exit codes:\n", "  ", kExitOk, "   success (for `train watch`: the job succeeded)\n", "  ",
      kExitError, "   local error (the stream ended early, the generation failed, output failed)\n",
      "  ", kExitUsage, "   bad command line, or a job file missing, unreadable or invalid\n", "  ",
      kExitJobFailed,
      "   `train watch`: the job failed (`train submit --request-id`: the job the id queued "
      "before failed)\n",
      "  ", kExitJobCancelled,
      "   `train watch`: the job was cancelled (`train submit --request-id`: likewise)\n", "  ",
      kExitGrpcBase,
      "+N gRPC error with status code N, printed as `loradctl: <CODE>: <message>`:\n");
  for (int code = 1; code < kCodeCount; ++code) {
    absl::StrAppend(&text, "      ", kExitGrpcBase + code, " ", kCodeNames[code], "\n");
  }
  return text;
}

}  // namespace lorad::cli
