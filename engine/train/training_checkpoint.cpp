#include "engine/train/training_checkpoint.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/runtime/durable_file.h"
#include "engine/train/checkpoint_folders.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// fsyncs every file and folder under `root` (the adapter folder was written by WritePeft).
absl::Status FsyncTree(const fs::path& root) {
  for (const auto& entry : fs::recursive_directory_iterator(root)) {
    if (auto s = SyncPath(entry.path().string()); !s.ok()) return s;
  }
  return SyncPath(root.string());
}

// JSON has no NaN or infinity (nlohmann writes them as null): those are written as the strings
// "nan", "inf" and "-inf" (a resumed job of an older lorad sums its losses from NaN; an evaluation
// may overflow), and read back as they were, or as NaN from null (what this file held before).
json Number(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return v;
}

// `key` of `j` as Number wrote it; `missing` where a checkpoint of an older lorad lacks it.
double ReadNumber(const json& j, const char* key, std::optional<double> missing = std::nullopt) {
  const auto it = j.find(key);
  if (it == j.end()) {
    if (missing) return *missing;
    return j.at(key).get<double>();  // throws: names the key
  }
  if (it->is_null()) return std::numeric_limits<double>::quiet_NaN();
  if (it->is_string()) {
    const std::string text = it->get<std::string>();
    if (text == "nan") return std::numeric_limits<double>::quiet_NaN();
    if (text == "inf") return std::numeric_limits<double>::infinity();
    if (text == "-inf") return -std::numeric_limits<double>::infinity();
  }
  return it->get<double>();  // throws for anything else
}

json StepToJson(const StepMetrics& m) {
  return json{{"step", m.step},
              {"total_steps", m.total_steps},
              {"epoch", Number(m.epoch)},
              {"loss", Number(m.loss)},
              {"learning_rate", Number(m.learning_rate)},
              {"grad_norm", Number(m.grad_norm)},
              {"tokens", m.tokens},
              {"tokens_per_s", Number(m.tokens_per_s)},
              {"step_time_s", Number(m.step_time_s)},
              {"elapsed_s", Number(m.elapsed_s)},
              {"eta_s", Number(m.eta_s)}};
}

StepMetrics StepFromJson(const json& j) {
  StepMetrics m;
  m.step = j.at("step").get<int64_t>();
  m.total_steps = j.at("total_steps").get<int64_t>();
  m.epoch = ReadNumber(j, "epoch");
  m.loss = ReadNumber(j, "loss");
  m.learning_rate = ReadNumber(j, "learning_rate");
  m.grad_norm = ReadNumber(j, "grad_norm");
  m.tokens = j.at("tokens").get<int64_t>();
  m.tokens_per_s = ReadNumber(j, "tokens_per_s");
  m.step_time_s = ReadNumber(j, "step_time_s");
  m.elapsed_s = ReadNumber(j, "elapsed_s");
  m.eta_s = ReadNumber(j, "eta_s");
  return m;
}

json StateToJson(const TrainerState& s) {
  json steps = json::array(), evals = json::array();
  for (const StepMetrics& m : s.recent_steps) steps.push_back(StepToJson(m));
  for (const EvalMetrics& e : s.recent_evals) {
    evals.push_back(json{{"step", e.step}, {"loss", Number(e.loss)}, {"tokens", e.tokens}});
  }
  return json{{"step", s.step},
              {"micro_batches", s.micro_batches},
              {"last_loss", Number(s.last_loss)},
              {"best_train_loss", Number(s.best_train_loss)},
              {"best_eval_loss", Number(s.best_eval_loss)},
              {"best_eval_step", s.best_eval_step},
              {"has_eval", s.has_eval},
              {"evals_without_improvement", s.evals_without_improvement},
              {"last_eval_step", s.last_eval_step},
              {"trained_tokens", s.trained_tokens},
              {"train_seconds", Number(s.train_seconds)},
              {"loss_sum", Number(s.loss_sum)},
              {"dataset_fingerprint", s.dataset_fingerprint},
              {"base_fingerprint", s.base_fingerprint},
              {"recent_steps", std::move(steps)},
              {"recent_evals", std::move(evals)}};
}

// Serializes `archive` in memory, then writes it to `path` (fsynced).
absl::Status WriteArchive(torch::serialize::OutputArchive& archive, const fs::path& path) {
  std::ostringstream bytes;
  archive.save_to(bytes);
  return WriteSyncedFile(path.string(), bytes.str());
}

// Writes the checkpoint into `tmp`, fsyncs it, and renames it to `final_path`.
absl::Status WriteCheckpointFolder(const fs::path& tmp, const fs::path& final_path,
                                   const std::string& output_dir, const LoraAdapter& adapter,
                                   const OptimizerState& optimizer, const RandomState& rng,
                                   const TrainerState& state) {
  try {
    std::error_code ec;
    fs::create_directories(output_dir, ec);
    if (ec) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot create output folder ", output_dir, ": ", ec.message()));
    }
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    if (auto s = adapter.WritePeft((tmp / "adapter").string()); !s.ok()) return s;
    // The archives are built in memory and written as plain files: torch's file writer fails
    // on a full disk by throwing from its destructor, which ends the process.
    {
      torch::serialize::OutputArchive archive;
      for (const auto& [key, tensor] : optimizer) archive.write(key, tensor);
      if (auto s = WriteArchive(archive, tmp / "optimizer.pt"); !s.ok()) return s;
    }
    {
      torch::serialize::OutputArchive archive;
      archive.write("cpu", rng.cpu);
      if (rng.cuda.defined()) archive.write("cuda", rng.cuda);
      if (auto s = WriteArchive(archive, tmp / "rng.pt"); !s.ok()) return s;
    }
    if (auto s = WriteSyncedFile((tmp / "trainer_state.json").string(), StateToJson(state).dump(2));
        !s.ok()) {
      return s;
    }
    if (auto s = FsyncTree(tmp); !s.ok()) return s;
    // A folder of this step already there (a resumed job writes its step again, a stop right
    // after a periodic checkpoint) is replaced in one swap where the filesystem can, so a kill
    // meanwhile leaves a complete checkpoint under the name.
    if (fs::exists(final_path)) {
      if (auto s = ReplaceFolder(tmp.string(), final_path.string()); !s.ok()) return s;
    } else {
      fs::rename(tmp, final_path);
    }
    return SyncPath(output_dir);
  } catch (const fs::filesystem_error& e) {
    return absl::InternalError(
        absl::StrCat("writing checkpoint ", final_path.string(), ": ", e.what()));
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("writing checkpoint ", final_path.string(), ": ", e.what_without_backtrace()));
  } catch (const std::exception& e) {  // a stream that failed (a full disk: std::ios_failure)
    return absl::InternalError(absl::StrCat("writing checkpoint ", final_path.string(), ": ",
                                            e.what(), " (is the disk full?)"));
  }
}

}  // namespace

absl::StatusOr<std::string> WriteCheckpoint(const std::string& output_dir,
                                            const LoraAdapter& adapter,
                                            const OptimizerState& optimizer, const RandomState& rng,
                                            const TrainerState& state, int64_t keep) {
  const fs::path final_path = CheckpointPath(output_dir, state.step);
  const fs::path tmp =
      fs::path(output_dir) / absl::StrCat(".", kCheckpointPrefix, state.step, ".tmp");
  absl::Status written =
      WriteCheckpointFolder(tmp, final_path, output_dir, adapter, optimizer, rng, state);
  if (!written.ok()) {
    std::error_code ec;
    fs::remove_all(tmp, ec);  // a full disk must not stay full of a half-written checkpoint
    return written;
  }
  if (keep > 0) {
    auto all = CompleteCheckpoints(output_dir);
    std::sort(all.begin(), all.end(),
              [](const auto& a, const auto& b) { return a.first > b.first; });
    for (size_t i = static_cast<size_t>(keep); i < all.size(); ++i) RemoveFolder(all[i].second);
  }
  return final_path.string();
}

absl::StatusOr<TrainingCheckpoint> ReadCheckpoint(const std::string& folder) {
  TrainingCheckpoint ckpt;
  auto adapter = LoraAdapter::ReadPeft((fs::path(folder) / "adapter").string());
  if (!adapter.ok()) return adapter.status();
  ckpt.adapter = *std::move(adapter);
  const fs::path state_path = fs::path(folder) / "trainer_state.json";
  try {
    std::ifstream in(state_path);
    if (!in)
      return absl::NotFoundError(absl::StrCat("checkpoint file missing: ", state_path.string()));
    const json j = json::parse(in);
    TrainerState& s = ckpt.state;
    s.step = j.at("step").get<int64_t>();
    s.micro_batches = j.at("micro_batches").get<int64_t>();
    s.last_loss = ReadNumber(j, "last_loss");
    s.best_train_loss = ReadNumber(j, "best_train_loss");
    s.best_eval_loss = ReadNumber(j, "best_eval_loss");
    s.has_eval = j.at("has_eval").get<bool>();
    s.evals_without_improvement = j.at("evals_without_improvement").get<int64_t>();
    // Absent from checkpoints of older lorad versions: the totals then start there.
    s.trained_tokens = j.value("trained_tokens", int64_t{0});
    s.train_seconds = ReadNumber(j, "train_seconds", 0.0);
    s.loss_sum = ReadNumber(j, "loss_sum", std::numeric_limits<double>::quiet_NaN());
    s.best_eval_step = j.value("best_eval_step", int64_t{0});
    s.last_eval_step = j.value("last_eval_step", int64_t{-1});
    s.dataset_fingerprint = j.value("dataset_fingerprint", std::string());
    s.base_fingerprint = j.value("base_fingerprint", std::string());
    if (const auto it = j.find("recent_steps"); it != j.end()) {
      for (const json& m : *it) s.recent_steps.push_back(StepFromJson(m));
    }
    if (const auto it = j.find("recent_evals"); it != j.end()) {
      for (const json& e : *it) {
        s.recent_evals.push_back(
            {e.at("step").get<int64_t>(), ReadNumber(e, "loss"), e.at("tokens").get<int64_t>()});
      }
    }
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint file ", state_path.string(), " is malformed: ", e.what()));
  }
  const fs::path opt_path = fs::path(folder) / "optimizer.pt";
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(opt_path.string());
    for (const std::string& key : archive.keys()) {
      torch::Tensor t;
      archive.read(key, t);
      ckpt.optimizer[key] = t;
    }
    torch::serialize::InputArchive rng;
    rng.load_from((fs::path(folder) / "rng.pt").string());
    rng.read("cpu", ckpt.rng.cpu);
    torch::Tensor cuda;
    if (rng.try_read("cuda", cuda)) ckpt.rng.cuda = cuda;  // absent: trained on the CPU
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint ", folder,
                     ": cannot read optimizer.pt or rng.pt: ", e.what_without_backtrace()));
  }
  return ckpt;
}

void TrainerState::Remember(const TrainingEvent& e) {
  if (e.replayed) return;
  if (e.kind == TrainingEvent::Kind::kStep) {
    recent_steps.push_back(e.step);
    if (recent_steps.size() > kRecentSteps) {
      recent_steps.erase(recent_steps.begin(),
                         recent_steps.end() - static_cast<std::ptrdiff_t>(kRecentSteps));
      const int64_t first = recent_steps.front().step;
      recent_evals.erase(std::remove_if(recent_evals.begin(), recent_evals.end(),
                                        [first](const EvalMetrics& m) { return m.step < first; }),
                         recent_evals.end());
    }
  } else if (e.kind == TrainingEvent::Kind::kEval) {
    recent_evals.push_back(e.eval);
  }
}

}  // namespace lorad::engine
