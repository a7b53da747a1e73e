// Where a training job's checkpoints live in its output folder: checkpoint-<step>/ folders, a
// complete one holding every file a resume reads. torch-free, so the server can ask which
// checkpoint a job resumes from; training_checkpoint.h reads and writes them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace lorad::engine {

inline constexpr char kCheckpointPrefix[] = "checkpoint-";

// output_dir/checkpoint-<step>
std::string CheckpointPath(const std::string& output_dir, int64_t step);

// The files a resume reads from a checkpoint folder; a folder missing one is not complete (a
// kill during a delete may leave part of a folder behind).
const std::vector<std::string>& CheckpointFiles();

// Every checkpoint-<step> folder in output_dir, in no particular order, with the first of
// CheckpointFiles() it lacks ("" when complete).
struct CheckpointFolder {
  int64_t step = 0;
  std::filesystem::path path;
  std::string missing;
};
std::vector<CheckpointFolder> CheckpointFolders(const std::string& output_dir);

// Every complete checkpoint folder in output_dir, with its step, in no particular order.
std::vector<std::pair<int64_t, std::filesystem::path>> CompleteCheckpoints(
    const std::string& output_dir);

// The newest complete checkpoint folder in output_dir, or "" when there is none.
std::string LatestCheckpoint(const std::string& output_dir);

// Deletes a folder so that no part of it is ever seen under its name: it is first renamed to a
// hidden name beside it (".deleting-<name>"), which RemoveLeftovers also clears. Best effort: a
// folder left behind costs space, not correctness.
void RemoveFolder(const std::filesystem::path& folder);

// Puts back a folder ReplaceFolder moved aside (".replaced-<name>") on a filesystem that cannot
// swap two (NFS, CIFS, many FUSE) where <name> is missing: the kill came between its two
// renames, and it is the only whole copy. Before a job's resume point is looked for.
void RestoreReplacedFolders(const std::string& output_dir);

// Clears what a killed process may have left in output_dir (after RestoreReplacedFolders):
// half-written checkpoints
// (".checkpoint-*.tmp"), adapters (".adapter.tmp-*", ".best-adapter.tmp-*"), merged exports
// ("merged.tmp") and reports ("eval_report.json.tmp"), half-deleted folders (".deleting-*"), and
// replaced ones whose successor took their name (".replaced-*").
void RemoveLeftovers(const std::string& output_dir);

}  // namespace lorad::engine
