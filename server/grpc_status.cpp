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

std::chrono::system_clock::time_point CallDeadline(const grpc::ServerContextBase& context) {
  using std::chrono::system_clock;
  const gpr_timespec raw = gpr_convert_clock_type(context.raw_deadline(), GPR_CLOCK_REALTIME);
  // Seconds whose nanoseconds fit, with room for tv_nsec.
  constexpr int64_t kLastSecond = std::numeric_limits<int64_t>::max() / 1000000000 - 1;
  if (raw.tv_sec > kLastSecond) return system_clock::time_point::max();
  if (raw.tv_sec < -kLastSecond) return system_clock::time_point::min();
  return system_clock::time_point(std::chrono::duration_cast<system_clock::duration>(
      std::chrono::seconds(raw.tv_sec) + std::chrono::nanoseconds(raw.tv_nsec)));
}

grpc::Status CancelledCallStatus(std::chrono::system_clock::time_point deadline) {
  // gRPC's deadline timer runs on another clock and may fire a little before the deadline it
  // reports here: a cancel that close to the deadline is the deadline's.
  constexpr auto kTimerSlack = std::chrono::milliseconds(100);
  if (deadline != std::chrono::system_clock::time_point::max() &&
      std::chrono::system_clock::now() + kTimerSlack >= deadline) {
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
