#include "clients/loradctl/adapter_commands.h"

#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "clients/loradctl/exit_codes.h"
#include "clients/loradctl/json_output.h"
#include "clients/loradctl/text_table.h"
#include "clients/loradctl/utf8_fields.h"

namespace lorad::cli {

namespace {

// "12.3 MiB": adapters range from kilobytes (tiny models) to gigabytes (high rank, 70B).
std::string FormatBytes(int64_t bytes) {
  constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 4) {
    value /= 1024;
    ++unit;
  }
  return unit == 0 ? absl::StrCat(bytes, " B") : absl::StrFormat("%.1f %s", value, kUnits[unit]);
}

std::string Source(const lorad::v1::Adapter& adapter) {
  if (!adapter.source_job_id().empty()) return adapter.source_job_id();
  if (!adapter.source_path().empty()) return adapter.source_path();
  return "-";
}

std::string Describe(const lorad::v1::Adapter& adapter) {
  return absl::StrFormat("%s v%d (rank %d, %s)", adapter.name(), adapter.version(), adapter.rank(),
                         FormatBytes(adapter.bytes()));
}

}  // namespace

int RunAdaptersList(Connection& connection, bool json) {
  lorad::v1::ListAdaptersResponse response;
  auto context = connection.NewContext(CallKind::kUnary);
  grpc::Status status = connection.adapters().ListAdapters(
      context.get(), lorad::v1::ListAdaptersRequest(), &response);
  if (!status.ok()) return connection.Fail(status);
  // For scripts: a SOURCE path or a SIZE may hold spaces in the table.
  if (json) return PrintJson(response, "the adapters");
  TextTable table({"NAME", "VERSION", "STATE", "RANK", "ALPHA", "TARGETS", "SIZE", "SOURCE",
                   "RESIDENT", "ACTIVE"});
  for (const auto& a : response.adapters()) {
    // draining: replaced or unloaded; new requests do not get it, running ones finish on it.
    // "other base": published on another base model than the one served (Adapter.other_base).
    const std::string state =
        absl::StrCat(a.current() ? "serving" : "draining", a.other_base() ? " (other base)" : "");
    table.AddRow({a.name(), absl::StrCat(a.version()), state, absl::StrCat(a.rank()),
                  absl::StrCat(a.alpha()), absl::StrJoin(a.target_modules(), ","),
                  FormatBytes(a.bytes()), Source(a), a.resident() ? "yes" : "no",
                  absl::StrCat(a.active_requests())});
  }
  table.Print(std::cout);
  return kExitOk;
}

int RunAdaptersLoad(Connection& connection, const std::string& name, const std::string& path) {
  lorad::v1::LoadAdapterRequest request;
  request.set_name(name);
  request.set_path(path);
  if (ReportInvalidUtf8(request)) return kExitUsage;
  lorad::v1::Adapter adapter;
  auto context = connection.NewContext(CallKind::kSlowUnary);
  grpc::Status status = connection.adapters().LoadAdapter(context.get(), request, &adapter);
  if (!status.ok()) return connection.Fail(status);
  std::cout << "loaded " << Describe(adapter) << std::endl;
  return kExitOk;
}

int RunAdaptersUnload(Connection& connection, const std::string& name, int64_t version) {
  lorad::v1::UnloadAdapterRequest request;
  request.set_name(name);
  request.set_version(version);
  if (ReportInvalidUtf8(request)) return kExitUsage;
  lorad::v1::UnloadAdapterResponse response;
  auto context = connection.NewContext(CallKind::kSlowUnary);
  grpc::Status status = connection.adapters().UnloadAdapter(context.get(), request, &response);
  if (!status.ok()) return connection.Fail(status);
  for (const auto& adapter : response.unloaded()) {
    std::cout << "unloaded " << Describe(adapter);
    // The call's deadline came before the requests on it ended: unloaded all the same.
    if (adapter.active_requests() > 0) {
      std::cout << " (draining: " << adapter.active_requests()
                << " running request(s) finish on it; it leaves memory when they end)";
    }
    std::cout << std::endl;
  }
  return kExitOk;
}

}  // namespace lorad::cli
