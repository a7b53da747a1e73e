#include "engine/train/training_data.h"

#include <algorithm>
#include <cmath>
#include <string_view>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "engine/model/utf8.h"
#include "engine/train/dataset_reader.h"

namespace lorad::engine {
namespace {

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Streams for Permutation(): distinct so the split and the epoch orders are independent.
constexpr uint64_t kSplitStream = 0xFFFFFFFF00000001ULL;
constexpr uint64_t kPackStream = 0xFFFFFFFF00000002ULL;

// Whether what an example trains has text: a text record, or an assistant turn (of those that
// train) that is not all white space.
bool HasAnswerText(const Example& example) {
  if (example.format == DatasetFormat::kText) return true;
  for (size_t i = example.first_trained_message; i < example.messages.size(); ++i) {
    const ChatMessage& m = example.messages[i];
    if (m.role == "assistant" && !absl::StripAsciiWhitespace(m.content).empty()) return true;
  }
  return false;
}

// The examples of one file (`role`: "training" or "validation", for messages), counting the
// records skipped as bad, dropped (nothing trained after truncation) and truncated. With
// max_records > 0 it stops after that many records (a check): no usable example among them is an
// error only when they were the whole file. `first_skipped` (optional, when empty): the first
// skipped record's place and reason.
absl::StatusOr<std::vector<TokenizedExample>> ReadAndFormat(
    const std::string& path, const char* role, const TrainingDataConfig& config,
    const ExampleFormatter& formatter, int64_t& skipped, int64_t& dropped, int64_t& truncated,
    int64_t max_records = 0, const std::atomic<bool>* abandon = nullptr,
    std::string* first_skipped = nullptr) {
  auto format = DatasetFormatFromName(config.format);
  if (!format.ok()) return format.status();
  DatasetReaderOptions options;
  options.format = *format;
  options.skip_bad_lines = config.skip_bad_lines;
  if (path == config.path) options.inline_name = config.inline_name;
  // The inline records' file is lorad's own, in the job's folder (whose path may hold symlinks).
  options.no_symlinks = config.resolved_paths && options.inline_name.empty();
  auto reader = DatasetReader::Open(path, options);
  if (!reader.ok()) return reader.status();
  std::vector<TokenizedExample> out;
  // The first record the formatter refused, and its line: the reader keeps its own first (a
  // record that is not JSON or lacks its fields); the error names whichever came first.
  std::string first_bad;
  int64_t first_bad_record = 0, formatter_skipped = 0;
  bool whole_file = true;
  bool answered = false;  // an example with an answer to learn
  for (int64_t records = 0;; ++records) {
    if (max_records > 0 && records == max_records) {
      // Read whole if nothing follows: a file of exactly max_records unusable records is refused
      // here too.
      auto more = (*reader)->Next();
      if (!more.ok()) return more.status();
      whole_file = !more->has_value();
      break;
    }
    // Every record: one long conversation can take a second to format.
    if (abandon != nullptr && abandon->load(std::memory_order_relaxed)) {
      return absl::CancelledError(absl::StrCat("reading ", path, " was abandoned"));
    }
    auto next = (*reader)->Next();
    if (!next.ok()) return next.status();
    if (!next->has_value()) break;
    auto t = formatter.Format(**next);
    if (!t.ok()) {
      const std::string why =
          absl::StrCat((*reader)->Where((**next).line), ": ", t.status().message());
      if (!config.skip_bad_lines) return absl::InvalidArgumentError(why);
      if (first_bad.empty()) {
        first_bad = Utf8Shortened(why, kMaxSkipReasonBytes);
        first_bad_record = (**next).record;
      }
      ++formatter_skipped;
      continue;
    }
    if (t->TrainedTokens() == 0) {  // e.g. the response was truncated away
      ++dropped;
      continue;
    }
    truncated += t->truncated;
    answered = answered || HasAnswerText(**next);
    out.push_back(*std::move(t));
  }
  // This file's skips (`skipped` may already hold the training file's).
  const int64_t skipped_here = formatter_skipped + (*reader)->skipped();
  skipped += skipped_here;
  // By place among the records, not by line: a one-line JSON array holds them all on line 1.
  if (const int64_t record = (*reader)->first_skip_record();
      record > 0 && (first_bad.empty() || record < first_bad_record)) {
    first_bad = (*reader)->first_skip_reason();
  }
  if (first_skipped != nullptr && first_skipped->empty()) *first_skipped = first_bad;
  if (out.empty() && whole_file) {
    return absl::InvalidArgumentError(absl::StrCat(
        (*reader)->name(), ": no usable ", role, " example (", skipped_here, " records skipped, ",
        dropped, " without a trained token after truncation to max_seq_length",
        first_bad.empty() ? std::string() : absl::StrCat("; the first skipped: ", first_bad), ")"));
  }
  // Answers all empty (a dataset export that lost them): the job would train the end of turn
  // alone, an adapter that makes the model answer nothing.
  if (!out.empty() && whole_file && !answered && formatter.response_only() &&
      std::string_view(role) == "training") {
    return absl::InvalidArgumentError(absl::StrCat(
        (*reader)->name(), ": every example's answer is empty (", out.size(),
        " examples): the job would only teach the model to end its reply at once; fill in the "
        "answers (the assistant messages, output, answer or completion), or train on whole "
        "records (dataset.response_only: false)"));
  }
  return out;
}

std::vector<TokenizedExample> Pack(const std::vector<TokenizedExample>& examples,
                                   int64_t max_seq_length, uint64_t seed, bool separate) {
  std::vector<TokenizedExample> rows;
  TokenizedExample row;
  for (int64_t i : Permutation(static_cast<int64_t>(examples.size()), seed, kPackStream)) {
    const TokenizedExample& e = examples[static_cast<size_t>(i)];
    if (!row.input_ids.empty() &&
        static_cast<int64_t>(row.input_ids.size() + e.input_ids.size()) > max_seq_length) {
      rows.push_back(std::move(row));
      row = TokenizedExample();
    }
    if (row.input_ids.empty()) {
      row.line = e.line;
    } else if (separate) {
      // The example starts a sequence of its own: its first token is not predicted from the
      // example before (TRL masks the labels where position_ids is 0).
      row.example_starts.push_back(static_cast<int32_t>(row.input_ids.size()));
    }
    const size_t start = row.labels.size();
    row.input_ids.insert(row.input_ids.end(), e.input_ids.begin(), e.input_ids.end());
    row.labels.insert(row.labels.end(), e.labels.begin(), e.labels.end());
    if (separate && start > 0) row.labels[start] = kNotTrained;
  }
  if (!row.input_ids.empty()) rows.push_back(std::move(row));
  return rows;
}

}  // namespace

int64_t TrainingStepsForEpochs(double num_epochs, int64_t micro_batches_per_epoch,
                               int64_t grad_accum) {
  const int64_t per_epoch = (micro_batches_per_epoch + grad_accum - 1) / grad_accum;
  return std::max<int64_t>(
      1, static_cast<int64_t>(std::ceil(num_epochs * static_cast<double>(per_epoch))));
}

int64_t HeldOutExamples(double validation_fraction, int64_t n) {
  return std::max<int64_t>(1, std::llround(validation_fraction * static_cast<double>(n)));
}

std::vector<int64_t> Permutation(int64_t n, uint64_t seed, uint64_t stream) {
  std::vector<int64_t> p(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) p[static_cast<size_t>(i)] = i;
  uint64_t state = seed * 0x9E3779B97F4A7C15ULL + stream;
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(SplitMix64(state) % static_cast<uint64_t>(i + 1));
    std::swap(p[static_cast<size_t>(i)], p[static_cast<size_t>(j)]);
  }
  return p;
}

absl::StatusOr<TrainingData> TrainingData::Build(const TrainingDataConfig& config,
                                                 const ExampleFormatter& formatter,
                                                 int64_t max_seq_length, uint64_t seed,
                                                 const std::atomic<bool>* abandon) {
  int64_t skipped = 0, dropped = 0, truncated = 0;
  std::string first_skipped;
  auto examples = ReadAndFormat(config.path, "training", config, formatter, skipped, dropped,
                                truncated, 0, abandon, &first_skipped);
  if (!examples.ok()) return examples.status();
  std::vector<TokenizedExample> validation;
  if (!config.validation_path.empty()) {
    // Its bad records count as skipped (lines of the job's data), its drops and truncations not:
    // those counts describe the training examples.
    int64_t validation_dropped = 0, validation_truncated = 0;
    auto v = ReadAndFormat(config.validation_path, "validation", config, formatter, skipped,
                           validation_dropped, validation_truncated, 0, abandon, &first_skipped);
    if (!v.ok()) return v.status();
    validation = *std::move(v);
  }
  auto data =
      FromExamples(*std::move(examples), std::move(validation), config, max_seq_length, seed);
  if (!data.ok()) return data.status();
  data->skipped_records_ = skipped;
  data->first_skipped_ = std::move(first_skipped);
  data->dropped_ = dropped;
  data->truncated_ = truncated;
  return data;
}

absl::Status TrainingData::Check(const TrainingDataConfig& config,
                                 const ExampleFormatter& formatter, int64_t max_records,
                                 const std::atomic<bool>* abandon) {
  for (const auto& [path, role] :
       {std::pair{&config.path, "training"}, std::pair{&config.validation_path, "validation"}}) {
    if (path->empty()) continue;
    int64_t skipped = 0, dropped = 0, truncated = 0;
    auto examples = ReadAndFormat(*path, role, config, formatter, skipped, dropped, truncated,
                                  max_records, abandon);
    if (!examples.ok()) return examples.status();
  }
  return absl::OkStatus();
}

absl::StatusOr<TrainingData> TrainingData::FromExamples(std::vector<TokenizedExample> examples,
                                                        std::vector<TokenizedExample> validation,
                                                        const TrainingDataConfig& config,
                                                        int64_t max_seq_length, uint64_t seed) {
  TrainingData data;
  data.shuffle_ = config.shuffle;
  data.seed_ = seed;
  const int64_t n = static_cast<int64_t>(examples.size());
  if (config.validation_path.empty() && config.validation_fraction > 0) {
    const int64_t held = HeldOutExamples(config.validation_fraction, n);
    if (held >= n) {
      return absl::InvalidArgumentError(absl::StrCat("dataset.validation_fraction ",
                                                     config.validation_fraction, " of ", n,
                                                     " examples leaves none for training"));
    }
    const std::vector<int64_t> order = Permutation(n, seed, kSplitStream);
    std::vector<bool> is_validation(static_cast<size_t>(n), false);
    for (int64_t i = n - held; i < n; ++i) is_validation[static_cast<size_t>(order[i])] = true;
    std::vector<TokenizedExample> train;
    for (int64_t i = 0; i < n; ++i) {
      (is_validation[static_cast<size_t>(i)] ? validation : train)
          .push_back(std::move(examples[static_cast<size_t>(i)]));
    }
    examples = std::move(train);
  }
  data.train_ = config.packing ? Pack(examples, max_seq_length, seed, config.packing_separate)
                               : std::move(examples);
  data.validation_ = std::move(validation);
  return data;
}

int64_t TrainingData::MicroBatchesPerEpoch(int64_t micro_batch_size) const {
  const int64_t n = static_cast<int64_t>(train_.size());
  return (n + micro_batch_size - 1) / micro_batch_size;
}

std::vector<int64_t> TrainingData::MicroBatch(int64_t k, int64_t micro_batch_size) const {
  const int64_t per_epoch = MicroBatchesPerEpoch(micro_batch_size);
  const int64_t epoch = k / per_epoch;
  const int64_t index = k % per_epoch;
  const int64_t n = static_cast<int64_t>(train_.size());
  if (shuffle_ && order_epoch_ != epoch) {
    order_ = Permutation(n, seed_, static_cast<uint64_t>(epoch));
    order_epoch_ = epoch;
  }
  std::vector<int64_t> rows;
  for (int64_t i = index * micro_batch_size; i < std::min(n, (index + 1) * micro_batch_size); ++i) {
    rows.push_back(shuffle_ ? order_[static_cast<size_t>(i)] : i);
  }
  return rows;
}

}  // namespace lorad::engine
