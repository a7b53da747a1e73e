#include "server/job_spec_validator.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <type_traits>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/lora/lora_config.h"
#include "engine/lora/peft_config.h"
#include "engine/runtime/durable_file.h"
#include "engine/train/dataset_reader.h"
#include "engine/train/example_formatter.h"
#include "engine/train/training_data.h"
#include "engine/train/training_job_config.h"
#include "re2/re2.h"
#include "server/path_policy.h"

namespace lorad::server {
namespace {

using lorad::v1::JobSpec;

// A job's LoRA dropout: PEFT allows up to 1, which would drop every input of the adapter.
constexpr double kMaxTrainingDropout = 0.99;

absl::Status Field(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// A number as it reads back exactly: StrCat's 6 digits showed alpha 1000001 as "1e+06", in
// range by its own message.
template <typename T>
std::string Exact(T value) {
  if constexpr (std::is_floating_point_v<T>) {
    char text[32];
    const auto written = std::to_chars(text, text + sizeof(text), value);
    return std::string(text, written.ptr);
  } else {
    return absl::StrCat(value);
  }
}

// In [lo, hi]; NaN fails.
template <typename T>
absl::Status InRange(const std::string& field, T value, T lo, T hi) {
  if (!(value >= lo && value <= hi)) {
    return Field(field,
                 absl::StrCat(Exact(value), " is out of range [", Exact(lo), ", ", Exact(hi), "]"));
  }
  return absl::OkStatus();
}

engine::DatasetFormat ToEngineFormat(lorad::v1::DatasetFormat f) {
  switch (f) {
    case lorad::v1::DATASET_FORMAT_ALPACA:
      return engine::DatasetFormat::kAlpaca;
    case lorad::v1::DATASET_FORMAT_CHAT:
      return engine::DatasetFormat::kChat;
    case lorad::v1::DATASET_FORMAT_COMPLETION:
      return engine::DatasetFormat::kCompletion;
    case lorad::v1::DATASET_FORMAT_TEXT:
      return engine::DatasetFormat::kText;
    case lorad::v1::DATASET_FORMAT_QA:
      return engine::DatasetFormat::kQa;
    default:
      return engine::DatasetFormat::kAuto;
  }
}

// An enum field holds any int32 on the wire: a number the proto does not name is refused, not
// run as the default.
absl::Status KnownEnum(const std::string& field, int value, bool (*is_valid)(int)) {
  if (is_valid(value)) return absl::OkStatus();
  return Field(field, absl::StrCat(value, " is not one of its values (see training.proto)"));
}

// PEFT's and TRL's "all-linear": the seven projections.
bool IsAllLinear(const lorad::v1::LoraSpec& lora) {
  return lora.target_modules_size() == 1 &&
         absl::AsciiStrToLower(lora.target_modules(0)) == "all-linear";
}

absl::Status ValidateLora(lorad::v1::LoraSpec& lora) {
  if (lora.r() == 0) lora.set_r(16);
  if (lora.alpha() == 0) lora.set_alpha(16);
  // None, or "all-linear": the seven projections.
  if (lora.target_modules().empty() || IsAllLinear(lora)) {
    lora.clear_target_modules();
    for (const auto& t : engine::KnownLoraTargets()) lora.add_target_modules(t);
  }
  // alpha / r scales every update: beyond 1e6 it overflows bf16 activations at the first step.
  const absl::Status checks[] = {
      InRange("lora.r", lora.r(), 1, engine::kMaxLoraRank),
      InRange("lora.alpha", static_cast<double>(lora.alpha()), 1e-6, 1e6),
      InRange("lora.dropout", static_cast<double>(lora.dropout()), 0.0, kMaxTrainingDropout),
  };
  for (const auto& s : checks) {
    if (!s.ok()) return s;
  }
  engine::LoraConfig config;
  config.r = lora.r();
  config.alpha = lora.alpha();
  config.dropout = lora.dropout();
  config.use_rslora = lora.use_rslora();
  config.target_modules.assign(lora.target_modules().begin(), lora.target_modules().end());
  if (auto s = config.Validate(); !s.ok()) return Field("lora", std::string(s.message()));
  return absl::OkStatus();
}

absl::Status ValidateTraining(lorad::v1::TrainingSpec& t, const JobSpecLimits& limits) {
  if (t.max_steps() == 0 && t.num_epochs() == 0) t.set_num_epochs(1);
  if (t.max_steps() != 0) {
    if (auto s = InRange<int64_t>("training.max_steps", t.max_steps(), 1, limits.max_steps);
        !s.ok())
      return s;
  } else if (auto s = InRange("training.num_epochs", t.num_epochs(), 1e-6, 1000.0); !s.ok()) {
    return s;
  }
  if (t.micro_batch_size() == 0) t.set_micro_batch_size(2);
  if (t.grad_accum() == 0) t.set_grad_accum(4);
  if (t.learning_rate() == 0) t.set_learning_rate(2e-4);
  if (auto s = InRange("training.warmup_ratio", t.warmup_ratio(), 0.0, 1.0); !s.ok()) return s;
  if (t.warmup_ratio() > 0 && t.has_warmup_steps()) {
    return Field("training.warmup_ratio", "give warmup_ratio or warmup_steps, not both");
  }
  if (!t.has_warmup_steps() && t.warmup_ratio() == 0) t.set_warmup_steps(5);
  if (!t.has_weight_decay()) t.set_weight_decay(0.01);
  if (!t.has_max_grad_norm()) t.set_max_grad_norm(1.0);
  if (t.max_seq_length() == 0) t.set_max_seq_length(2048);
  if (!t.has_gradient_checkpointing()) t.set_gradient_checkpointing(true);
  if (!t.has_keep_checkpoints()) t.set_keep_checkpoints(2);
  const absl::Status checks[] = {
      InRange("training.micro_batch_size", t.micro_batch_size(), 1, 1024),
      InRange("training.grad_accum", t.grad_accum(), 1, 4096),
      InRange("training.learning_rate", t.learning_rate(), 1e-10, 1.0),
      InRange("training.warmup_steps", t.warmup_steps(), 0, 1000000),
      InRange("training.weight_decay", t.weight_decay(), 0.0, 10.0),
      InRange("training.max_grad_norm", t.max_grad_norm(), 0.0, 1e6),
      InRange("training.max_seq_length", t.max_seq_length(), 8, limits.max_seq_length),
      InRange("training.eval_every", t.eval_every(), 0, 1000000),
      InRange("training.save_every", t.save_every(), 0, 1000000),
      InRange("training.keep_checkpoints", t.keep_checkpoints(), 0, 1000000),
      InRange("training.early_stopping_patience", t.early_stopping_patience(), 0, 1000),
      InRange("training.keep_activations_layers", t.keep_activations_layers(), 0,
              limits.model_layers > 0 ? static_cast<int32_t>(limits.model_layers) : 1024),
      InRange("training.keep_mlp_layers", t.keep_mlp_layers(), 0,
              limits.model_layers > 0 ? static_cast<int32_t>(limits.model_layers) : 1024),
  };
  for (const auto& s : checks) {
    if (!s.ok()) return s;
  }
  if (!t.gradient_checkpointing()) {  // both shape what checkpointing keeps
    if (t.offload_activations()) {
      return Field("training.offload_activations",
                   "needs training.gradient_checkpointing (it offloads the checkpointed layers' "
                   "inputs)");
    }
    if (t.keep_activations_layers() > 0) {
      return Field("training.keep_activations_layers",
                   "needs training.gradient_checkpointing (without it every layer keeps its "
                   "activations)");
    }
    if (t.keep_mlp_layers() > 0) {
      return Field("training.keep_mlp_layers",
                   "needs training.gradient_checkpointing (without it every layer keeps its "
                   "activations)");
    }
  }
  if (limits.model_layers > 0 && t.keep_mlp_layers() > 0 &&
      int64_t{t.keep_activations_layers()} + t.keep_mlp_layers() > limits.model_layers) {
    return Field("training.keep_mlp_layers",
                 absl::StrCat(t.keep_mlp_layers(), " MLPs kept and ", t.keep_activations_layers(),
                              " layers kept (training.keep_activations_layers) are more than the "
                              "model's ",
                              limits.model_layers,
                              " layers: an MLP is kept only in a checkpointed layer; lower one"));
  }
  if (auto s = KnownEnum("training.optimizer", t.optimizer(), lorad::v1::Optimizer_IsValid);
      !s.ok())
    return s;
  if (auto s = KnownEnum("training.schedule", t.schedule(), lorad::v1::LrSchedule_IsValid); !s.ok())
    return s;
  // 0 is proto3's "unset": the engine's default, Unsloth's random_state.
  if (t.seed() == 0) t.set_seed(engine::TrainingJobConfig().seed);
  return absl::OkStatus();
}

absl::StatusOr<ValidatedDataset> ValidateDataset(lorad::v1::DatasetSpec& d,
                                                 const JobSpecLimits& limits,
                                                 const std::atomic<bool>* abandon) {
  if (!d.has_response_only()) d.set_response_only(true);
  if (d.has_packing_separate() && !d.packing()) {
    return Field("dataset.packing_separate", "applies only to packing; set dataset.packing: true");
  }
  if (d.packing() && !d.has_packing_separate()) d.set_packing_separate(true);
  const std::vector<std::string> templates = engine::ExampleFormatter::TemplateNames();
  if (!d.template_().empty() &&
      std::find(templates.begin(), templates.end(), d.template_()) == templates.end()) {
    return Field("dataset.template",
                 absl::StrCat("'", d.template_(), "' is unknown (known: empty, ",
                              absl::StrJoin(templates, ", "), ")"));
  }
  if (auto s = InRange("dataset.validation_fraction", d.validation_fraction(), 0.0, 0.5); !s.ok())
    return s;
  if (auto s = KnownEnum("dataset.format", d.format(), lorad::v1::DatasetFormat_IsValid); !s.ok())
    return s;
  if (d.validation_fraction() > 0 && !d.validation_path().empty()) {
    return Field("dataset.validation_fraction",
                 "set it or dataset.validation_path, not both (the file is the validation split)");
  }
  engine::DatasetReaderOptions options;
  options.format = ToEngineFormat(d.format());
  options.skip_bad_lines = d.skip_bad_lines();
  // The paths counted are resolved inside the root first: a symlink put in the way between that
  // and the read (to a file outside the root, whose keys an error would quote) is refused.
  options.no_symlinks = true;
  ValidatedDataset result;
  const bool has_path = !d.path().empty();
  const bool has_inline = d.inline_examples_size() > 0;
  if (has_path == has_inline) {
    return Field("dataset", "give exactly one of dataset.path and dataset.inline_examples");
  }
  if (has_inline) {
    if (d.inline_examples_size() > limits.max_inline_examples) {
      return Field(std::string(kInlineExamples),
                   absl::StrCat(d.inline_examples_size(), " examples; at most ",
                                limits.max_inline_examples, " inline (use dataset.path)"));
    }
    for (int i = 0; i < d.inline_examples_size(); ++i) {
      auto ex = engine::DatasetReader::ParseRecord(d.inline_examples(i).json(), options.format,
                                                   absl::StrCat(kInlineExamples, "[", i, "]"));
      if (ex.ok()) {
        ++result.examples;
      } else if (options.skip_bad_lines) {
        ++result.skipped;
      } else {
        return absl::InvalidArgumentError(ex.status().message());
      }
    }
  } else {
    auto resolved = ResolveInsideRoot(limits.dataset_root, d.path(), "dataset.path");
    if (!resolved.ok()) return resolved.status();
    auto examples = engine::CountDataset(*resolved, options, &result.skipped, abandon);
    if (absl::IsCancelled(examples.status())) return examples.status();
    if (!examples.ok()) {
      return Field("dataset.path", std::string(examples.status().message()));
    }
    result.examples = *examples;
    result.resolved_path = *resolved;
    d.set_path(*resolved);
  }
  if (result.examples == 0) return Field("dataset", "no usable examples");
  if (d.validation_path().empty() && d.validation_fraction() > 0 &&
      engine::HeldOutExamples(d.validation_fraction(), result.examples) >= result.examples) {
    return Field("dataset.validation_fraction",
                 absl::StrCat(d.validation_fraction(), " of ", result.examples,
                              " examples leaves none for training; add examples or give a "
                              "validation_path"));
  }
  if (!d.validation_path().empty()) {
    auto resolved =
        ResolveInsideRoot(limits.dataset_root, d.validation_path(), "dataset.validation_path");
    if (!resolved.ok()) return resolved.status();
    auto examples = engine::CountDataset(*resolved, options, nullptr, abandon);
    if (absl::IsCancelled(examples.status())) return examples.status();
    if (!examples.ok()) {
      return Field("dataset.validation_path", std::string(examples.status().message()));
    }
    d.set_validation_path(*resolved);
  }
  return result;
}

}  // namespace

absl::Status CheckAdapterName(const std::string& name, const std::string& field) {
  static const RE2 kName("[A-Za-z0-9][A-Za-z0-9._-]{0,63}");
  if (!RE2::FullMatch(name, kName) || name.find("..") != std::string::npos) {
    return Field(field, absl::StrCat("'", name,
                                     "' must be 1-64 characters of letters, digits, '.', '_' or "
                                     "'-', starting with a letter or digit, without '..'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ValidatedDataset> ValidateJobSpec(JobSpec& spec, const JobSpecLimits& limits,
                                                 const std::atomic<bool>* abandon) {
  if (auto s = CheckAdapterName(spec.adapter_name(), "adapter_name"); !s.ok()) return s;
  if (auto s = InRange("priority", spec.priority(), -1000, 1000); !s.ok()) return s;
  if (auto s = ValidateLora(*spec.mutable_lora()); !s.ok()) return s;
  if (auto s = ValidateTraining(*spec.mutable_training(), limits); !s.ok()) return s;
  auto dataset = ValidateDataset(*spec.mutable_dataset(), limits, abandon);
  if (!dataset.ok()) return dataset.status();
  // The rules across fields (evaluation needs a validation split, early stopping needs
  // evaluation, ...) are the trainer's own: checked here so a job that would fail at its start
  // is refused at submission.
  if (auto s = TrainingJobConfigOf(spec, "<job folder>").Validate(); !s.ok()) {
    return absl::InvalidArgumentError(s.message());
  }
  return dataset;
}

absl::Status ResolveInitAdapter(JobSpec& spec, const std::vector<ServedAdapter>& served) {
  // Filled in here. A version a client asks for (a spec copied from an earlier job) is the one
  // it must continue: one served no longer is refused, not replaced by the current one.
  const int64_t asked_version = spec.init_adapter_version();
  if (spec.init_adapter().empty() && (asked_version != 0 || !spec.init_adapter_path().empty())) {
    return absl::InvalidArgumentError(
        "init_adapter_path and init_adapter_version are filled in by lorad from init_adapter, "
        "which is empty: name the adapter to continue with init_adapter");
  }
  spec.clear_init_adapter_path();
  spec.clear_init_adapter_version();
  spec.clear_init_adapter_fingerprint();
  if (spec.init_adapter().empty()) return absl::OkStatus();
  if (auto s = CheckAdapterName(spec.init_adapter(), "init_adapter"); !s.ok()) return s;
  const auto found = std::find_if(served.begin(), served.end(), [&](const ServedAdapter& a) {
    return a.served && a.name == spec.init_adapter();
  });
  if (found == served.end()) {
    return absl::NotFoundError(absl::StrCat("init_adapter: adapter '", spec.init_adapter(),
                                            "' is not served; load it first (LoadAdapter)"));
  }
  if (asked_version != 0 && asked_version != found->version) {
    return absl::FailedPreconditionError(absl::StrCat(
        "init_adapter_version: ", asked_version, " was asked, but adapter '", spec.init_adapter(),
        "' serves version ", found->version,
        " now and a job continues the version served; leave init_adapter_version unset to "
        "continue it, or load that version's folder under another name"));
  }
  // Taken before the settings are read: files changed after it fail the job at its start.
  auto fingerprint = engine::PeftFolderFingerprint(found->path);
  if (!fingerprint.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "init_adapter: adapter '", spec.init_adapter(), "': ", fingerprint.status().message()));
  }
  if (!found->fingerprint.empty() && *fingerprint != found->fingerprint) {
    return absl::FailedPreconditionError(
        absl::StrCat("init_adapter: adapter '", spec.init_adapter(), "' version ", found->version,
                     ": its folder ", found->path,
                     " holds other files than when it was loaded; load it again (LoadAdapter) "
                     "to serve, and continue, what it holds now"));
  }
  const std::string file = found->path + "/adapter_config.json";
  std::ifstream in(file, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in) {
    return absl::FailedPreconditionError(absl::StrCat("init_adapter: cannot read ", file,
                                                      " of adapter '", spec.init_adapter(), "'"));
  }
  engine::PeftModulePatterns patterns;
  auto config = engine::ParsePeftConfig(text.str(), file, &patterns);
  if (!config.ok()) return Field("init_adapter", std::string(config.status().message()));
  if (!patterns.rank.empty() || !patterns.alpha.empty()) {
    return Field("init_adapter",
                 absl::StrCat("adapter '", spec.init_adapter(),
                              "' has per-module ranks or alphas (rank_pattern / alpha_pattern): "
                              "lorad serves such adapters but does not train them further"));
  }
  // Each setting left unset takes the adapter's; one given must be the adapter's (the trainer
  // continues with those of the folder).
  lorad::v1::LoraSpec& lora = *spec.mutable_lora();
  const auto differs = [&](const std::string& field, const std::string& given,
                           const std::string& has) {
    return Field("lora." + field,
                 absl::StrCat(given, ", but init_adapter '", spec.init_adapter(), "' has ", has,
                              " (", file, "); leave it unset to continue with the adapter's"));
  };
  if (lora.r() != 0 && lora.r() != config->r) {
    return differs("r", absl::StrCat(lora.r()), absl::StrCat(config->r));
  }
  if (lora.alpha() != 0 && lora.alpha() != config->alpha) {
    return differs("alpha", absl::StrCat(lora.alpha()), absl::StrCat(config->alpha));
  }
  if (lora.dropout() != 0 && lora.dropout() != config->dropout) {
    return differs("dropout", absl::StrCat(lora.dropout()), absl::StrCat(config->dropout));
  }
  // PEFT's range reaches 1, which drops every LoRA input: nothing would train.
  if (config->dropout > kMaxTrainingDropout) {
    return Field(
        "init_adapter",
        absl::StrCat("adapter '", spec.init_adapter(), "' has lora_dropout ", config->dropout, " (",
                     file, "), which drops every LoRA input: ",
                     "training continues adapters of dropout up to ", kMaxTrainingDropout));
  }
  const std::set<std::string> targets(config->target_modules.begin(), config->target_modules.end());
  std::set<std::string> given(lora.target_modules().begin(), lora.target_modules().end());
  if (IsAllLinear(lora))
    given = {engine::KnownLoraTargets().begin(), engine::KnownLoraTargets().end()};
  if (!given.empty() && given != targets) {
    return differs("target_modules", absl::StrJoin(given, ", "), absl::StrJoin(targets, ", "));
  }
  if (lora.use_rslora() && !config->use_rslora) return differs("use_rslora", "true", "false");
  lora.set_r(config->r);
  lora.set_alpha(config->alpha);
  lora.set_dropout(config->dropout);
  lora.set_use_rslora(config->use_rslora);
  lora.clear_target_modules();
  for (const std::string& t : config->target_modules) lora.add_target_modules(t);
  spec.set_init_adapter_path(found->path);
  spec.set_init_adapter_version(found->version);
  spec.set_init_adapter_fingerprint(*fingerprint);
  return absl::OkStatus();
}

absl::Status CheckInitAdapterUnchanged(const JobSpec& spec) {
  if (spec.init_adapter_path().empty() || spec.init_adapter_fingerprint().empty()) {
    return absl::OkStatus();
  }
  const absl::Status s = engine::CheckPeftFolderFingerprint(
      spec.init_adapter_path(), spec.init_adapter_fingerprint(), "when the job was submitted");
  if (s.ok()) return s;
  return absl::FailedPreconditionError(
      absl::StrCat("init_adapter: adapter '", spec.init_adapter(), "' version ",
                   spec.init_adapter_version(), ": ", s.message(),
                   " (deleted with the job that trained it, or replaced?); load the adapter again "
                   "(LoadAdapter) and submit a job that continues what it serves"));
}

engine::TrainingJobConfig TrainingJobConfigOf(const JobSpec& spec, const std::string& output_dir) {
  engine::TrainingJobConfig c;
  const auto& d = spec.dataset();
  c.output_dir = output_dir;
  c.init_adapter_path = spec.init_adapter_path();
  c.init_adapter_fingerprint = spec.init_adapter_fingerprint();
  if (d.inline_examples_size() > 0) {
    c.data.path = output_dir + "/inline_dataset.jsonl";  // the job runner writes it, one a line
    c.data.inline_name = std::string(kInlineExamples);
  } else {
    c.data.path = d.path();
  }
  c.data.format = engine::DatasetFormatName(ToEngineFormat(d.format()));
  c.data.template_name = d.template_().empty() ? "auto" : d.template_();
  c.data.response_only = !d.has_response_only() || d.response_only();
  c.data.packing = d.packing();
  // Unset in a packing job submitted to a lorad before the field: it packed the classic way.
  c.data.packing_separate = d.packing_separate();
  c.data.skip_bad_lines = d.skip_bad_lines();
  c.data.validation_fraction = d.validation_fraction();
  c.data.validation_path = d.validation_path();

  const auto& l = spec.lora();
  if (l.r() > 0) c.lora.r = l.r();
  if (l.alpha() > 0) c.lora.alpha = l.alpha();
  c.lora.dropout = l.dropout();
  if (l.target_modules_size() > 0) {
    c.lora.target_modules.assign(l.target_modules().begin(), l.target_modules().end());
  }
  c.lora.use_rslora = l.use_rslora();

  const auto& t = spec.training();
  c.max_steps = t.max_steps();
  if (t.num_epochs() > 0) c.num_epochs = t.num_epochs();
  if (t.micro_batch_size() > 0) c.micro_batch_size = t.micro_batch_size();
  if (t.grad_accum() > 0) c.grad_accum = t.grad_accum();
  if (t.learning_rate() > 0) c.learning_rate = t.learning_rate();
  c.schedule = t.schedule() == lorad::v1::LR_SCHEDULE_COSINE     ? "cosine"
               : t.schedule() == lorad::v1::LR_SCHEDULE_CONSTANT ? "constant"
                                                                 : "linear";
  if (t.has_warmup_steps()) c.warmup_steps = t.warmup_steps();
  c.warmup_ratio = t.warmup_ratio();
  if (t.has_weight_decay()) c.weight_decay = t.weight_decay();
  if (t.has_max_grad_norm()) c.max_grad_norm = t.max_grad_norm();
  c.optimizer = t.optimizer() == lorad::v1::OPTIMIZER_ADAMW ? "adamw" : "adamw_8bit";
  if (t.max_seq_length() > 0) c.max_seq_length = t.max_seq_length();
  c.gradient_checkpointing = !t.has_gradient_checkpointing() || t.gradient_checkpointing();
  c.offload_activations = t.offload_activations();
  c.keep_activations_layers = t.keep_activations_layers();
  c.keep_mlp_layers = t.keep_mlp_layers();
  if (t.seed() != 0) c.seed = t.seed();
  c.eval_every = t.eval_every();
  c.save_every = t.save_every();
  if (t.has_keep_checkpoints()) c.keep_checkpoints = t.keep_checkpoints();
  c.early_stopping_patience = t.early_stopping_patience();
  c.load_best_at_end = t.load_best_at_end();
  c.resume = true;
  if (spec.export_merged()) c.export_merged_dtype = "auto";  // the base checkpoint's 16/32-bit
  return c;
}

int64_t TotalSteps(const JobSpec& spec, int64_t examples) {
  const auto& t = spec.training();
  if (t.max_steps() > 0) return t.max_steps();
  // The trainer's own count (an estimate still: packing and examples dropped at max_seq_length
  // change the rows; the first step event carries the exact total).
  const auto& d = spec.dataset();
  const int64_t train = d.validation_path().empty() && d.validation_fraction() > 0
                            ? examples - engine::HeldOutExamples(d.validation_fraction(), examples)
                            : examples;
  const int64_t micro_batches = (std::max<int64_t>(train, 1) + t.micro_batch_size() - 1) /
                                static_cast<int64_t>(t.micro_batch_size());
  return engine::TrainingStepsForEpochs(t.num_epochs(), micro_batches, t.grad_accum());
}

absl::StatusOr<engine::TrainingJobConfig> TrainingJobConfigFromSpec(
    const lorad::v1::JobSpec& spec, const std::string& output_dir,
    const std::string& dataset_root) {
  for (const auto& [field, path] :
       {std::pair{"dataset.path", &spec.dataset().path()},
        std::pair{"dataset.validation_path", &spec.dataset().validation_path()}}) {
    if (path->empty()) continue;
    if (auto resolved = ResolveInsideRoot(dataset_root, *path, field); !resolved.ok()) {
      // Recorded inside the root at submit (resolved): a path no longer under it as written
      // means the root was pointed elsewhere since; one still under it, that a symlink in its
      // way leads out now.
      if (!absl::IsPermissionDenied(resolved.status())) return resolved.status();
      std::error_code ec;
      const std::string root = std::filesystem::weakly_canonical(dataset_root, ec).string();
      if (!ec && absl::StartsWith(*path, root + "/")) {
        return absl::PermissionDeniedError(absl::StrCat(
            resolved.status().message(),
            " (a symlink put in its way since the job was submitted); submit the job again"));
      }
      return absl::PermissionDeniedError(absl::StrCat(
          resolved.status().message(),
          " (storage.dataset_root changed since the job was submitted; point it back, or submit "
          "the job again with a file under the new root)"));
    } else if (*resolved != *path) {  // stored resolved at submit: a symlink appeared since
      return absl::PermissionDeniedError(
          absl::StrCat(field, ": '", *path, "' now resolves to '", *resolved,
                       "'; it changed since the job was submitted; submit the job again"));
    }
  }
  std::error_code ec;
  std::filesystem::create_directories(output_dir, ec);
  if (ec) {
    // Storage that refuses (a full disk, a folder lorad may not write) may take it later: the
    // job waits. Anything else (a file where the folder goes) fails it, and the queue goes on.
    const std::string message = absl::StrCat("cannot create ", output_dir, ": ", ec.message());
    const int e = ec.value();
    const bool storage =
        e == ENOSPC || e == EDQUOT || e == EROFS || e == EACCES || e == EPERM || e == EIO;
    return storage ? absl::UnavailableError(message) : absl::InternalError(message);
  }
  engine::TrainingJobConfig c = TrainingJobConfigOf(spec, output_dir);
  // Resolved inside the dataset root at submit and checked again just above (the inline records'
  // file, lorad's own, is not opened that way).
  c.data.resolved_paths = true;
  if (spec.dataset().inline_examples_size() > 0) {
    std::string jsonl;
    // One example a line, whatever its layout: a line break becomes a tab, which between tokens
    // is whitespace like it (a valid record means the same) and inside a string is a control
    // character JSON refuses like it (a record invalid at submit, skipped there with
    // skip_bad_lines, stays invalid; a space made it valid and trained as altered text).
    for (int i = 0; i < spec.dataset().inline_examples_size(); ++i) {
      std::string line = spec.dataset().inline_examples(i).json();
      std::replace(line.begin(), line.end(), '\n', '\t');
      std::replace(line.begin(), line.end(), '\r', '\t');
      absl::StrAppend(&jsonl, line, "\n");
    }
    // Rewritten at every start only when it changed (a resumed job's folder may be read-only).
    const absl::StatusOr<std::string> stored =
        std::filesystem::exists(c.data.path, ec)
            ? engine::ReadRegularFile(c.data.path, "the job's inline examples")
            : absl::NotFoundError("");
    const bool same = stored.ok() && *stored == jsonl;
    // Private as jobs.db, which holds the same examples (an older lorad wrote it 0644).
    if (same) std::filesystem::permissions(c.data.path, std::filesystem::perms(0600), ec);
    if (auto s = same ? absl::OkStatus()
                      : engine::WriteFileAtomically(c.data.path, jsonl, engine::kPrivateFile);
        !s.ok()) {
      return engine::IsStorageFailure(s) ? absl::UnavailableError(s.message()) : s;
    }
  }
  if (auto s = c.Validate(); !s.ok()) return s;
  return c;
}

}  // namespace lorad::server
