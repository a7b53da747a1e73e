// TrainingData: a job's dataset, read, formatted and tokenized once, split into training and
// validation rows, optionally packed, and ordered per epoch from the job's seed. torch-free.
//
// Rules (tests/parity/reference_trainer.py follows the unshuffled ones to build the same batches):
//   - examples with no trained label after truncation are dropped (counted in dropped());
//   - validation_fraction f > 0: a seeded permutation of the examples; its last
//     max(1, round(f * n)) go to validation, the rest stay in file order for training;
//     validation_path instead reads a second file;
//   - packing: training examples, in a seeded order, are appended greedily into rows of at most
//     max_seq_length tokens (an example never splits; one that does not fit starts a new row);
//     with packing_separate (the default) each example attends only to itself, its positions
//     start at 0 and its first token is not trained (TRL's padding-free packing), without it
//     the examples attend to each other (the classic constant-length packing);
//   - epoch e's order: the identity without shuffle, else Permutation(n, seed, e);
//   - micro-batches: consecutive runs of micro_batch_size rows of an epoch's order; the last one
//     of an epoch may be shorter. Micro-batch k of the whole run is (epoch, index) =
//     (k / per_epoch, k % per_epoch).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/train/example_formatter.h"
#include "engine/train/training_job_config.h"

namespace lorad::engine {

// Optimizer steps for num_epochs passes over micro_batches_per_epoch micro-batches, as
// transformers' Trainer counts them: ceil(micro-batches / grad_accum) a pass (the last step of a
// pass takes what is left), times num_epochs, rounded up; at least 1.
int64_t TrainingStepsForEpochs(double num_epochs, int64_t micro_batches_per_epoch,
                               int64_t grad_accum);

// How many of n examples validation_fraction holds out (at least one; TrainingData::Build fails
// when that leaves none for training, and SubmitJob checks the same up front).
int64_t HeldOutExamples(double validation_fraction, int64_t n);

// A seeded permutation of [0, n), the same on every platform (SplitMix64 + Fisher-Yates; the
// standard library's distributions are implementation-defined).
std::vector<int64_t> Permutation(int64_t n, uint64_t seed, uint64_t stream);

class TrainingData {
 public:
  // Reads config.path (and validation_path), formats every record with `formatter`. CANCELLED
  // soon after `*abandon` turns true (a job cancelled, or a shutdown, while it reads).
  static absl::StatusOr<TrainingData> Build(const TrainingDataConfig& config,
                                            const ExampleFormatter& formatter,
                                            int64_t max_seq_length, uint64_t seed,
                                            const std::atomic<bool>* abandon = nullptr);
  // What Build would refuse, from at most `max_records` records of each file (a check when a
  // job is submitted, without tokenizing a large dataset twice): a record the template cannot
  // take, or no usable example in a file read whole. CANCELLED soon after `*abandon` turns true
  // (the client gone, a shutdown).
  static absl::Status Check(const TrainingDataConfig& config, const ExampleFormatter& formatter,
                            int64_t max_records, const std::atomic<bool>* abandon = nullptr);
  // From already tokenized examples (tests).
  static absl::StatusOr<TrainingData> FromExamples(std::vector<TokenizedExample> examples,
                                                   std::vector<TokenizedExample> validation,
                                                   const TrainingDataConfig& config,
                                                   int64_t max_seq_length, uint64_t seed);

  const std::vector<TokenizedExample>& train() const { return train_; }
  const std::vector<TokenizedExample>& validation() const { return validation_; }

  int64_t MicroBatchesPerEpoch(int64_t micro_batch_size) const;
  // Row indices into train() of micro-batch k of the run. Keeps the last epoch's order (one
  // job's trainer calls it, from one thread at a time): drawing it anew for every micro-batch
  // cost O(n) each, 5.7 ms a micro-batch at a million examples.
  std::vector<int64_t> MicroBatch(int64_t k, int64_t micro_batch_size) const;

  int64_t skipped_records() const { return skipped_records_; }
  // The first skipped record's place and why ("data.jsonl:7: field 'output' is missing"): the
  // training file's, else the validation file's; empty when none was skipped.
  const std::string& first_skipped() const { return first_skipped_; }
  int64_t dropped() const { return dropped_; }
  int64_t truncated() const { return truncated_; }

 private:
  std::vector<TokenizedExample> train_;
  std::vector<TokenizedExample> validation_;
  bool shuffle_ = true;
  uint64_t seed_ = 0;
  mutable int64_t order_epoch_ = -1;  // the epoch order_ is the order of; -1 = none yet
  mutable std::vector<int64_t> order_;
  int64_t skipped_records_ = 0;
  std::string first_skipped_;
  int64_t dropped_ = 0;
  int64_t truncated_ = 0;
};

}  // namespace lorad::engine
