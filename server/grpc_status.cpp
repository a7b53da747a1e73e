#include "server/grpc_status.h"

#include <grpc/support/time.h>

#include <cstdint>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace lorad::server {

namespace {

// A status message travels in a header (grpc-message, percent-encoded) that clients cap at 8 to
// 16 KiB by default: a message quoting a huge request value would turn the real status into the
// client's own RESOURCE_EXHAUSTED. Keep the head (the field and the value's start) and the tail
// (what to do), cut on UTF-8 character boundaries.
std::string FitForHeader(absl::string_view m) {
  constexpr size_t kMax = 2048, kHead = 1400, kTail = 600;
  if (m.size() <= kMax) return std::string(m);
  auto continuation = [&](size_t i) { return (static_cast<unsigned char>(m[i]) & 0xC0) == 0x80; };
  size_t head = kHead;
  while (head > 0 && continuation(head)) --head;
  size_t tail = m.size() - kTail;
  while (tail < m.size() && continuation(tail)) ++tail;
  return absl::StrCat(m.substr(0, head), " [... ", tail - head, " bytes left out ...] ",
                      m.substr(tail));
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl::StatusCode and grpc::StatusCode share their numbering (both follow google.rpc.Code).
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(status.code())),
                      FitForHeader(status.message()));
}

std::chrono::steady_clock::time_point CallDeadline(const grpc::ServerContextBase& context) {
  using std::chrono::steady_clock;
  // The time left, on gRPC's monotonic clock (the one it keeps deadlines on), from now on the
  // steady clock: a wall clock stepped meanwhile (NTP, a VM resumed) moves neither.
  const gpr_timespec left =
      gpr_time_sub(gpr_convert_clock_type(context.raw_deadline(), GPR_CLOCK_MONOTONIC),
                   gpr_now(GPR_CLOCK_MONOTONIC));
  // Beyond ten years, or gRPC's infinite future: none (gpr_time_sub saturates there).
  constexpr int64_t kTenYears = int64_t{10} * 365 * 24 * 3600;
  if (left.tv_sec > kTenYears) return steady_clock::time_point::max();
  if (left.tv_sec < -kTenYears) return steady_clock::now() - std::chrono::hours(24 * 365 * 10);
  return steady_clock::now() +
         std::chrono::duration_cast<steady_clock::duration>(std::chrono::seconds(left.tv_sec) +
                                                            std::chrono::nanoseconds(left.tv_nsec));
}

grpc::Status CancelledCallStatus(std::chrono::steady_clock::time_point deadline) {
  // gRPC's deadline timer may fire a little before the deadline it reports here: a cancel that
  // close to the deadline is the deadline's.
  constexpr auto kTimerSlack = std::chrono::milliseconds(100);
  if (deadline != std::chrono::steady_clock::time_point::max() &&
      std::chrono::steady_clock::now() + kTimerSlack >= deadline) {
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the call's deadline passed");
  }
  return grpc::Status::CANCELLED;
}

grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status) {
  auto* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace lorad::server
