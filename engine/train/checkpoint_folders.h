// Where a training job's checkpoints live in its output folder: checkpoint-<step>/ folders, a
// complete one holding trainer_state.json (written last). torch-free, so the server can ask which
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

// Every complete checkpoint folder in output_dir, with its step, in no particular order.
std::vector<std::pair<int64_t, std::filesystem::path>> CompleteCheckpoints(
    const std::string& output_dir);

// The newest complete checkpoint folder in output_dir, or "" when there is none.
std::string LatestCheckpoint(const std::string& output_dir);

}  // namespace lorad::engine
