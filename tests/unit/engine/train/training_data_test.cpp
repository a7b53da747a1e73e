#include "engine/train/training_data.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "absl/strings/match.h"
#include "engine/model/tokenizer.h"
#include "engine/train/example_formatter.h"
#include "engine/train/micro_batch.h"
#include "engine/train/training_job_config.h"

namespace lorad::engine {
namespace {

TokenizedExample Ex(int n, int32_t first) {
  TokenizedExample e;
  for (int i = 0; i < n; ++i) {
    e.input_ids.push_back(first + i);
    e.labels.push_back(i == 0 ? kNotTrained : first + i);
  }
  e.line = first;
  return e;
}

std::vector<TokenizedExample> Examples(int count, int len) {
  std::vector<TokenizedExample> out;
  for (int i = 0; i < count; ++i) out.push_back(Ex(len, 100 * i));
  return out;
}

// A file of `lines` in a fresh folder of the test's temporary directory.
std::string WriteLines(const std::string& name, const std::vector<std::string>& lines) {
  const std::filesystem::path path =
      std::filesystem::path(::testing::TempDir()) / ("training_data_test-" + name);
  std::ofstream out(path);
  for (const std::string& line : lines) out << line << "\n";
  return path.string();
}

// With skip_bad_lines and nothing usable, the error names the first skipped record of the file
// (the reader's refusals and the template's are kept apart: the template's was named first
// whatever its line), and counts that file's skips only (a validation file's count included the
// training file's).
TEST(TrainingData, NothingUsableNamesTheFirstSkippedRecordAndThisFilesCount) {
  const char* folder = std::getenv("LORAD_TINY_MODEL");
  auto tokenizer = LoadTokenizer(folder);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  ExampleFormatterOptions options;
  options.template_name = "alpaca";
  auto formatter = ExampleFormatter::Create(**tokenizer, folder, options);
  ASSERT_TRUE(formatter.ok()) << formatter.status();
  const std::string not_a_record = R"({"text": 5})";
  const std::string three_turns =
      R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},)"
      R"( {"role": "user", "content": "c"}]})";
  const std::string good = R"({"question": "What is one and one?", "answer": "Two."})";
  TrainingDataConfig config;
  config.skip_bad_lines = true;
  config.template_name = "alpaca";
  config.path = WriteLines("all-bad.jsonl", {not_a_record, three_turns});
  auto data = TrainingData::Build(config, *formatter, 64, 1);
  ASSERT_FALSE(data.ok());
  EXPECT_NE(data.status().message().find("2 records skipped"), std::string::npos) << data.status();
  EXPECT_NE(data.status().message().find("the first skipped: " + config.path + ":1: "),
            std::string::npos)
      << data.status();

  // The submit-time check of at most N records (those the reader parses: line 1 is skipped
  // inside it): a file of exactly N unusable records is the whole file, refused as Build refuses
  // it (it passed, and the job failed when it started). One more record after them: not whole.
  EXPECT_FALSE(TrainingData::Check(config, *formatter, 1).ok());
  EXPECT_FALSE(TrainingData::Check(config, *formatter, 2).ok());
  TrainingDataConfig longer = config;
  longer.path = WriteLines("two-refused.jsonl", {three_turns, three_turns});
  EXPECT_TRUE(TrainingData::Check(longer, *formatter, 1).ok());

  config.path = WriteLines("mixed.jsonl", {good, not_a_record, three_turns, good, not_a_record});
  config.validation_path = WriteLines("validation-bad.jsonl", {three_turns, not_a_record});
  data = TrainingData::Build(config, *formatter, 64, 1);
  ASSERT_FALSE(data.ok());
  EXPECT_NE(data.status().message().find("no usable validation example (2 records skipped"),
            std::string::npos)
      << data.status();
  EXPECT_NE(data.status().message().find("validation-bad.jsonl:1: "), std::string::npos)
      << data.status();

  // Some skipped, the job goes on: the first one skipped is kept for its summary (the training
  // file's, though the validation file's comes before it by line).
  config.path = WriteLines("some-bad.jsonl", {good, good, three_turns, not_a_record});
  config.validation_path = WriteLines("validation-some-bad.jsonl", {not_a_record, good});
  data = TrainingData::Build(config, *formatter, 64, 1);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_EQ(data->skipped_records(), 3);
  EXPECT_EQ(data->first_skipped().rfind(config.path + ":3: ", 0), 0u) << data->first_skipped();

  // One JSON array on one line (json.dump): the first skipped is told by its place among the
  // records, not by its line (all on line 1; the template's refusal of record [1] was named).
  config.path = WriteLines(
      "one-line.json", {"[" + not_a_record + ", " + three_turns + ", " + good + ", " + good + "]"});
  config.validation_path.clear();
  data = TrainingData::Build(config, *formatter, 64, 1);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_EQ(data->first_skipped().rfind(config.path + ":1 (record [0] of the array)", 0), 0u)
      << data->first_skipped();
}

// Answers all empty (or white space): refused, naming the file; it trained the end of turn alone
// and published an adapter that answers nothing. One answer, or whole records trained, is enough.
TEST(TrainingData, ADatasetWhoseAnswersAreAllEmptyIsRefused) {
  const char* folder = std::getenv("LORAD_TINY_MODEL");
  auto tokenizer = LoadTokenizer(folder);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto formatter = ExampleFormatter::Create(**tokenizer, folder, {});
  ASSERT_TRUE(formatter.ok()) << formatter.status();
  const std::string empty_qa = R"({"question": "What is one and one?", "answer": ""})";
  const std::string empty_chat =
      R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]})";
  TrainingDataConfig config;
  config.path = WriteLines("empty-answers.jsonl", {empty_qa, empty_chat});
  for (const absl::Status& status : {TrainingData::Build(config, *formatter, 64, 1).status(),
                                     TrainingData::Check(config, *formatter, 4096)}) {
    ASSERT_FALSE(status.ok());
    EXPECT_NE(status.message().find(config.path + ": every example's answer is empty (2 examples)"),
              std::string::npos)
        << status;
  }
  config.path =
      WriteLines("one-answer.jsonl", {empty_qa, R"({"question": "And two?", "answer": "Four."})"});
  EXPECT_TRUE(TrainingData::Build(config, *formatter, 64, 1).ok());
  ExampleFormatterOptions whole;
  whole.response_only = false;
  auto whole_formatter = ExampleFormatter::Create(**tokenizer, folder, whole);
  ASSERT_TRUE(whole_formatter.ok()) << whole_formatter.status();
  config.path = WriteLines("empty-answers-whole.jsonl", {empty_qa, empty_chat});
  EXPECT_TRUE(TrainingData::Build(config, *whole_formatter, 64, 1).ok());
}

// The template a merged export carries where it is not the folder's: under auto, Alpaca's prompt
// once every example took it (Alpaca records), none where conversations took the model's own.
TEST(TrainingData, UnderAutoTheTrainedTemplateIsAlpacaOnlyWhereEveryExampleTookIt) {
  const char* folder = std::getenv("LORAD_TINY_MODEL");
  auto tokenizer = LoadTokenizer(folder);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const std::string alpaca = R"({"instruction": "Add one and one.", "input": "", "output": "2"})";
  const std::string chat =
      R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})";
  const auto trained = [&](const std::vector<std::string>& lines) {
    auto formatter = ExampleFormatter::Create(**tokenizer, folder, {});
    EXPECT_TRUE(formatter.ok()) << formatter.status();
    TrainingDataConfig config;
    config.path = WriteLines("trained-template.jsonl", lines);
    EXPECT_TRUE(TrainingData::Build(config, *formatter, 256, 1).ok());
    return formatter->TrainedTemplateNotTheFolders();
  };
  EXPECT_EQ(trained({alpaca, alpaca}), "alpaca");
  EXPECT_EQ(trained({chat, chat}), "");
  EXPECT_EQ(trained({alpaca, chat}), "");
}

// A conversation whose turns run past max_seq_length formats as the same conversation formatted
// in full and truncated: the same tokens and labels (its later turns are not rendered, each a
// render and encode of the conversation so far: 2,000 turns took 23 s). And the submit-time
// check gives up when its caller has (the client gone; it went on formatting for minutes).
TEST(TrainingData, LongConversationsFormatAsTruncatedAndTheCheckCanBeAbandoned) {
  const char* folder = std::getenv("LORAD_TINY_MODEL");
  auto tokenizer = LoadTokenizer(folder);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  Example chat;
  chat.format = DatasetFormat::kChat;
  for (int turn = 0; turn < 60; ++turn) {
    chat.messages.push_back({"user", "question number " + std::to_string(turn)});
    chat.messages.push_back({"assistant", "answer " + std::to_string(turn * 7)});
  }
  ExampleFormatterOptions options;
  options.template_name = "chatml";
  options.max_seq_length = 100000;
  auto whole = ExampleFormatter::Create(**tokenizer, folder, options);
  ASSERT_TRUE(whole.ok()) << whole.status();
  auto full = whole->Format(chat);
  ASSERT_TRUE(full.ok()) << full.status();
  ASSERT_GT(full->input_ids.size(), 400u);
  for (const int64_t max : {64, 100, 257}) {
    options.max_seq_length = max;
    auto cut = ExampleFormatter::Create(**tokenizer, folder, options);
    ASSERT_TRUE(cut.ok()) << cut.status();
    auto formatted = cut->Format(chat);
    ASSERT_TRUE(formatted.ok()) << formatted.status();
    const auto n = static_cast<std::ptrdiff_t>(max);
    EXPECT_EQ(formatted->input_ids,
              std::vector<int32_t>(full->input_ids.begin(), full->input_ids.begin() + n));
    EXPECT_EQ(formatted->labels,
              std::vector<int32_t>(full->labels.begin(), full->labels.begin() + n))
        << "max_seq_length " << max;
    EXPECT_TRUE(formatted->truncated);
  }

  TrainingDataConfig config;
  config.template_name = "chatml";
  config.path = WriteLines("chat.jsonl", {R"({"messages": [{"role": "user", "content": "a"},)"
                                          R"( {"role": "assistant", "content": "b"}]})"});
  EXPECT_TRUE(TrainingData::Check(config, *whole, 10).ok());
  const std::atomic<bool> gone{true};
  const absl::Status abandoned = TrainingData::Check(config, *whole, 10, &gone);
  EXPECT_TRUE(absl::IsCancelled(abandoned)) << abandoned;
}

// Range errors name the field as a job spec spells it: dataset fields under "dataset.", the
// others under "training." (the dataset's was "training.dataset.validation_fraction").
TEST(TrainingJobConfig, RangeErrorsNameTheFieldAsTheJobSpecSpellsIt) {
  TrainingJobConfig config;
  config.data.path = "data.jsonl";
  config.data.validation_fraction = 0.7;
  absl::Status s = config.Validate();
  EXPECT_TRUE(absl::StartsWith(s.message(), "dataset.validation_fraction is 0.7; it must be")) << s;
  config.data.validation_fraction = 0.1;
  config.micro_batch_size = 0;
  s = config.Validate();
  EXPECT_TRUE(absl::StartsWith(s.message(), "training.micro_batch_size is 0; it must be")) << s;
}

TEST(Permutation, DeterministicFromSeedAndAPermutation) {
  const auto a = Permutation(50, 7, 0);
  EXPECT_EQ(a, Permutation(50, 7, 0));
  EXPECT_NE(a, Permutation(50, 8, 0));
  EXPECT_NE(a, Permutation(50, 7, 1));
  std::vector<int64_t> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 50; ++i) EXPECT_EQ(sorted[i], i);
}

TEST(TrainingData, ValidationSplitIsDisjointAndSized) {
  TrainingDataConfig config;
  config.validation_fraction = 0.25;
  auto data = TrainingData::FromExamples(Examples(20, 3), {}, config, 64, 42);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_EQ(data->validation().size(), 5u);
  EXPECT_EQ(data->train().size(), 15u);
  std::set<int64_t> lines;
  for (const auto& e : data->train()) lines.insert(e.line);
  for (const auto& e : data->validation()) EXPECT_EQ(lines.count(e.line), 0u);
  // Training rows keep file order.
  for (size_t i = 1; i < data->train().size(); ++i) {
    EXPECT_LT(data->train()[i - 1].line, data->train()[i].line);
  }
}

TEST(TrainingData, ValidationFractionLeavingNothingIsAnError) {
  TrainingDataConfig config;
  config.validation_fraction = 0.5;
  auto data = TrainingData::FromExamples(Examples(1, 3), {}, config, 64, 42);
  EXPECT_FALSE(data.ok());
}

TEST(TrainingData, PackingFillsRowsWithoutSplittingExamples) {
  TrainingDataConfig config;
  config.packing = true;
  auto data = TrainingData::FromExamples(Examples(10, 6), {}, config, 20, 1);
  ASSERT_TRUE(data.ok());
  EXPECT_EQ(data->train().size(), 4u);  // 3 examples of 6 per 20-token row: 3 + 3 + 3 + 1
  int64_t tokens = 0;
  for (const auto& row : data->train()) {
    EXPECT_LE(row.input_ids.size(), 20u);
    EXPECT_EQ(row.input_ids.size() % 6, 0u);
    EXPECT_EQ(row.input_ids.size(), row.labels.size());
    tokens += static_cast<int64_t>(row.input_ids.size());
  }
  EXPECT_EQ(tokens, 60);
}

// Packed examples kept apart (the default): each row records where its examples start, their
// first tokens are not trained, and its micro-batch carries positions that start again at each
// (padding goes on from the row's last); the classic packing keeps the labels and has none.
TEST(TrainingData, PackedExamplesKeptApartStartTheirPositionsAgain) {
  TrainingDataConfig config;
  config.packing = true;
  std::vector<TokenizedExample> examples = Examples(5, 6);
  for (auto& e : examples) e.labels[0] = e.input_ids[0];  // trained everywhere
  auto data = TrainingData::FromExamples(examples, {}, config, 20, 1);
  ASSERT_TRUE(data.ok()) << data.status();
  ASSERT_EQ(data->train().size(), 2u);  // 3 + 2 examples of 6
  const TokenizedExample& full = data->train()[0];
  EXPECT_EQ(full.example_starts, (std::vector<int32_t>{6, 12}));
  for (int t : {6, 12})
    EXPECT_EQ(full.labels[t], kNotTrained) << t;  // the row's first: never scored
  EXPECT_EQ(full.labels[7], full.input_ids[7]);
  EXPECT_EQ(full.TrainedTokens(), 15);  // 5 of each example's 6

  const MicroBatchTensors mb = MakeBatch(data->train(), {0, 1});
  ASSERT_TRUE(mb.batch.positions.defined());
  EXPECT_TRUE(torch::equal(mb.batch.positions,
                           torch::tensor({0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4,  5,  //
                                          0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11})
                               .view({2, 18})));
  // The target of position t is row label t + 1: none at 5 and 11 (the next example's first).
  const torch::Tensor targets = mb.targets.view({2, 18});
  EXPECT_EQ(targets[0][5].item<int64_t>(), kIgnoreLabel);
  EXPECT_EQ(targets[0][11].item<int64_t>(), kIgnoreLabel);
  EXPECT_EQ(targets[0][6].item<int64_t>(), full.input_ids[7]);
  EXPECT_EQ((targets != kIgnoreLabel).sum().item<int64_t>(),
            full.TrainedTokens() + data->train()[1].TrainedTokens());

  config.packing_separate = false;
  auto classic = TrainingData::FromExamples(examples, {}, config, 20, 1);
  ASSERT_TRUE(classic.ok());
  EXPECT_TRUE(classic->train()[0].example_starts.empty());
  EXPECT_EQ(classic->train()[0].labels[6], classic->train()[0].input_ids[6]);
  EXPECT_FALSE(MakeBatch(classic->train(), {0, 1}).batch.positions.defined());
}

TEST(TrainingData, EpochsCoverEveryRowOnceInSeededOrder) {
  TrainingDataConfig config;
  auto data = TrainingData::FromExamples(Examples(7, 3), {}, config, 64, 9);
  ASSERT_TRUE(data.ok());
  EXPECT_EQ(data->MicroBatchesPerEpoch(2), 4);
  std::vector<int64_t> epoch0, epoch1;
  for (int64_t k = 0; k < 4; ++k) {
    for (int64_t i : data->MicroBatch(k, 2)) epoch0.push_back(i);
    for (int64_t i : data->MicroBatch(k + 4, 2)) epoch1.push_back(i);
  }
  EXPECT_EQ(data->MicroBatch(3, 2).size(), 1u);  // the last of an epoch is short
  EXPECT_NE(epoch0, epoch1);                     // reshuffled
  std::sort(epoch0.begin(), epoch0.end());
  std::sort(epoch1.begin(), epoch1.end());
  EXPECT_EQ(epoch0, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(epoch1, epoch0);
  config.shuffle = false;
  auto ordered = TrainingData::FromExamples(Examples(7, 3), {}, config, 64, 9);
  EXPECT_EQ(ordered->MicroBatch(1, 2), (std::vector<int64_t>{2, 3}));
}

}  // namespace
}  // namespace lorad::engine
