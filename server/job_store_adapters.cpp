// JobStore: the adapters table, what lorad serves across a restart: each name's newest version,
// its folder, where it came from, and the base model it was made on.
#include <sqlite3.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/job_store.h"
#include "server/sqlite_statement.h"

namespace lorad::server {
namespace {

// What ReadAdapters reads, in its order.
constexpr const char* kAdapterColumns =
    "name, version, path, source, served, fingerprint, base_fingerprint";

}  // namespace

absl::Status JobStore::RecordAdapter(const ServedAdapter& a) {
  std::lock_guard<std::mutex> lock(mu_);
  return RecordAdapterLocked(a);
}

absl::Status JobStore::RecordAdapterLocked(const ServedAdapter& a) {
  // Never back to an older version: two loads of one name may record in either order.
  Statement s(db_,
              "INSERT INTO adapters (name, version, path, source, served, fingerprint, "
              "base_fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
              "version = excluded.version, path = excluded.path, source = excluded.source, served "
              "= excluded.served, fingerprint = excluded.fingerprint, base_fingerprint = "
              "excluded.base_fingerprint WHERE excluded.version >= adapters.version;");
  s.BindText(1, a.name).Bind(2, a.version).BindText(3, a.path).BindText(4, a.source);
  s.Bind(5, static_cast<int64_t>(a.served ? 1 : 0)).BindText(6, a.fingerprint);
  // With the version it belongs to: an older lorad that publishes a newer version leaves it.
  const std::string& base = a.base_fingerprint.empty() ? base_fingerprint_ : a.base_fingerprint;
  s.BindText(7, base.empty() ? "" : absl::StrCat(a.version, ":", base));
  return s.Run();
}

absl::Status JobStore::FillUnknownAdapterBases(const std::string& fingerprint) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_,
              "UPDATE adapters SET base_fingerprint = version || ':' || ? WHERE base_fingerprint "
              "NOT LIKE version || ':%';");
  s.BindText(1, fingerprint);
  return s.Run();
}

absl::Status JobStore::MarkAdapterUnserved(const std::string& name, int64_t version) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, "UPDATE adapters SET served = 0 WHERE name = ? AND version <= ?;");
  s.BindText(1, name).Bind(2, version);
  return s.Run();
}

absl::StatusOr<std::vector<ServedAdapter>> JobStore::Adapters() {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, absl::StrCat("SELECT ", kAdapterColumns, " FROM adapters ORDER BY name;"));
  return ReadAdapters(s);
}

absl::StatusOr<std::vector<ServedAdapter>> JobStore::ServedAdapters(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  Statement s(db_, absl::StrCat("SELECT ", kAdapterColumns, " FROM adapters WHERE served = 1",
                                name.empty() ? " ORDER BY name;" : " AND name = ?;"));
  if (!name.empty()) s.BindText(1, name);
  return ReadAdapters(s);
}

absl::StatusOr<std::vector<ServedAdapter>> JobStore::ReadAdapters(Statement& s) {
  std::vector<ServedAdapter> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) {
    out.push_back({s.Blob(0), s.Int(1), s.Blob(2), s.Blob(3), s.Int(4) != 0, s.Blob(5), ""});
    // "<version>:<base>"; another version's base is not this one's.
    const std::string base = s.Blob(6);
    const std::string prefix = absl::StrCat(out.back().version, ":");
    if (absl::StartsWith(base, prefix)) out.back().base_fingerprint = base.substr(prefix.size());
  }
  if (rc != SQLITE_DONE) return s.StepError();
  return out;
}

}  // namespace lorad::server
