#include "engine/train/trainer.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <thread>

#include "engine/lora/lora_adapter.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_weights.h"
#include "engine/model/tokenizer.h"
#include "engine/train/answer_evaluation.h"
#include "engine/train/dataset_reader.h"
#include "engine/train/example_formatter.h"
#include "engine/train/training_checkpoint.h"
#include "nlohmann/json.hpp"
#include "tests/unit/engine/train/trainer_test_fixture.h"

namespace lorad::engine {
namespace {

// A job's dataset that changed between its checkpoint and a resume is refused, naming the file:
// the rest of the job would train on other examples.
TEST_F(TrainerTest, AResumeRefusesADatasetThatChanged) {
  TrainingJobConfig config = Config("changed");
  fs::create_directories(out_);
  const fs::path copy = out_ / "qa.jsonl";
  fs::copy_file(config.data.path, copy);
  config.data.path = copy.string();
  config.save_every = 2;
  {
    auto first = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
    ASSERT_TRUE(first.ok()) << first.status();
    while ((*first)->step() < 2) ASSERT_TRUE((*first)->Step().ok());
  }
  auto same = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_TRUE((*same)->resumed());
  std::ofstream(copy, std::ios::app) << R"({"question": "Added later?", "answer": "Yes."})"
                                     << "\n";
  auto changed = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
  ASSERT_FALSE(changed.ok());
  EXPECT_EQ(changed.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(changed.status().message().find(copy.string() + ") changed since the job started"),
            std::string::npos)
      << changed.status();
  // Said before the dataset is read and tokenized (minutes for a large one): a line the read
  // would refuse is never reached.
  std::ofstream(copy, std::ios::app) << "not json\n";
  auto early = Trainer::PrepareData(*model_, *tokenizer_, model_dir_, config);
  ASSERT_FALSE(early.ok());
  EXPECT_NE(early.status().message().find("changed since the job started"), std::string::npos)
      << early.status();
}

// A job resumed on another base model of the same shapes (here the fixture with one projection's
// weights changed, as another revision or a fine-tune of it) is refused: the rest of the job would
// train on it. The same model copied to another folder resumes (where it is plays no part).
TEST_F(TrainerTest, AResumeRefusesAnotherBaseModel) {
  TrainingJobConfig config = Config("other-base");
  config.save_every = 2;
  {
    auto first = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
    ASSERT_TRUE(first.ok()) << first.status();
    while ((*first)->step() < 2) ASSERT_TRUE((*first)->Step().ok());
  }
  const fs::path moved = out_ / "moved-base";
  const fs::path other = out_ / "other-base";
  for (const fs::path& copy : {moved, other}) {
    fs::create_directories(copy);
    for (const auto& entry : fs::directory_iterator(model_dir_)) {
      fs::copy_file(entry.path(), copy / entry.path().filename());
    }
  }
  auto same = Trainer::Create(*model_, *tokenizer_, moved.string(), config, nullptr);
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_TRUE((*same)->resumed());

  {  // other-base: layer 0's q_proj weights changed in their last bits
    auto file = SafetensorsFile::Open((other / "model.safetensors").string(),
                                      SafetensorsFile::Access::kRead);
    ASSERT_TRUE(file.ok()) << file.status();
    std::vector<std::vector<uint8_t>> bytes;
    bytes.reserve((*file)->tensors().size());  // the views point into these
    std::vector<TensorView> tensors;
    for (const TensorView& t : (*file)->tensors()) {
      bytes.emplace_back(t.data, t.data + t.nbytes);
      if (t.name == "model.layers.0.self_attn.q_proj.weight") {
        for (uint8_t& b : bytes.back()) b ^= 1;
      }
      TensorView copy = t;
      copy.data = bytes.back().data();
      tensors.push_back(copy);
    }
    ASSERT_TRUE(WriteSafetensors((other / "model.safetensors").string(), tensors).ok());
  }
  auto base = LlamaModel::Load(other.string(), LlamaModelOptions());
  ASSERT_TRUE(base.ok()) << base.status();
  auto refused = Trainer::Create(**base, *tokenizer_, other.string(), config, nullptr);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("the base model in " + other.string() +
                                            " is not the one the job started on"),
            std::string::npos)
      << refused.status();
}

// A job continuing an adapter made elsewhere trains on this base: the adapter it publishes names
// this model folder (PEFT loads it onto the model named there). An adapter of a base with fewer
// layers is refused, naming what it lacks: PEFT would train the missing layers from scratch.
TEST_F(TrainerTest, AContinuedAdapterNamesTheBaseItTrainedOnAndOneOfFewerLayersIsRefused) {
  LoraConfig lora;
  lora.r = 8;
  lora.base_model_name_or_path = "/models/another-base";
  auto made_elsewhere = LoraAdapter::Init(model_->config(), lora, 3);
  ASSERT_TRUE(made_elsewhere.ok()) << made_elsewhere.status();
  ASSERT_TRUE(made_elsewhere->WritePeft((out_ / "elsewhere").string()).ok());
  TrainingJobConfig config = Config("continued");
  config.init_adapter_path = (out_ / "elsewhere").string();
  config.max_steps = 1;
  TrainingSummary summary;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config, [&](const TrainingEvent& e) {
    if (e.kind == TrainingEvent::Kind::kFinished) summary = e.summary;
  });
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->Run().ok());
  auto published = LoraAdapter::ReadPeft(summary.adapter_path);
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_EQ(published->config.base_model_name_or_path, model_dir_);

  ModelConfig one_layer = model_->config();
  one_layer.num_hidden_layers = 1;
  auto shallow = LoraAdapter::Init(one_layer, lora, 3);
  ASSERT_TRUE(shallow.ok()) << shallow.status();
  ASSERT_TRUE(shallow->WritePeft((out_ / "shallow").string()).ok());
  config = Config("continued-shallow");
  config.init_adapter_path = (out_ / "shallow").string();
  auto refused = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find(
                "init_adapter '" + (out_ / "shallow").string() +
                "': the adapter has no LoRA weights for model.layers.1.self_attn.q_proj and 6 "
                "more modules"),
            std::string::npos)
      << refused.status();
}

// The operator's model.chat_template is part of the base for a job that takes the model's own
// template ("auto", "chat"): changed between a stop and a resume, the rest would be formatted
// otherwise. A job naming its template (alpaca) formats the same whatever it is, and resumes.
TEST_F(TrainerTest, AResumeRefusesAnotherOperatorTemplateOnlyForJobsThatTakeIt) {
  for (const std::string& template_name : {std::string("auto"), std::string("alpaca")}) {
    SCOPED_TRACE(template_name);
    TrainingJobConfig config = Config("operator-template-" + template_name);
    config.data.template_name = template_name;
    config.save_every = 2;
    {
      auto first = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
      ASSERT_TRUE(first.ok()) << first.status();
      while ((*first)->step() < 2) ASSERT_TRUE((*first)->Step().ok());
    }
    config.data.model_chat_template = "chatml";
    auto again = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
    if (template_name == "auto") {
      ASSERT_FALSE(again.ok());
      EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition) << again.status();
    } else {
      ASSERT_TRUE(again.ok()) << again.status();
      EXPECT_TRUE((*again)->resumed());
    }
  }
}

// The learning requirement of the trainer issue: 60 steps on the Q&A fixture lower the loss at
// least 5x, and greedy answers to the training questions then contain the reference answers.
// The fixture model is tiny (2 layers, hidden 128) with frozen random embeddings, so it needs a
// wider adapter and more examples per step than the notebook recipe: r=32, 8 examples per step,
// a constant rate. Measured: 6.47 -> 0.99.
TEST_F(TrainerTest, LearnsTheQaFileOnAnNf4Base) {
  LlamaModelOptions options;
  options.base = BaseWeights::kNf4;
  auto nf4 = LlamaModel::Load(model_dir_, options);
  ASSERT_TRUE(nf4.ok()) << nf4.status();
  TrainingJobConfig config = Config("learn");
  config.max_steps = 60;
  config.micro_batch_size = 8;
  config.grad_accum = 1;
  config.learning_rate = 3e-3;
  config.schedule = "constant";
  config.warmup_steps = 5;
  config.lora.r = 32;
  config.lora.alpha = 64;
  config.optimizer = "adamw_8bit";
  config.weight_decay = 0.0;
  std::vector<TrainingEvent> events;
  auto t = Trainer::Create(**nf4, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { events.push_back(e); });
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->Run().ok());
  const std::vector<double> losses = Losses(events);
  ASSERT_EQ(losses.size(), 60u);
  EXPECT_LT(losses.back() * 5, losses.front())
      << "first " << losses.front() << " last " << losses.back();
  for (const auto& e : events) {
    if (e.kind != TrainingEvent::Kind::kStep) continue;
    EXPECT_GT(e.step.tokens, 0);
    EXPECT_GT(e.step.tokens_per_s, 0);
    EXPECT_GE(e.step.grad_norm, 0);
    EXPECT_EQ(e.step.total_steps, 60);
  }
  ASSERT_EQ(events.back().kind, TrainingEvent::Kind::kFinished);
  const TrainingSummary& s = events.back().summary;
  EXPECT_EQ(s.final_loss, losses.back());
  auto adapter = LoraAdapter::ReadPeft(s.adapter_path);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ(adapter->config.r, 32);
  EXPECT_EQ(adapter->layers.size(), 14u);  // 7 projections x 2 layers

  // Greedy answers: each question formatted as in training (the prompt part of the example),
  // then decoded token by token with the trained adapter on the NF4 base.
  auto formatter = ExampleFormatter::Create(*tokenizer_, model_dir_, {});
  ASSERT_TRUE(formatter.ok()) << formatter.status();
  auto reader = DatasetReader::Open(config.data.path);
  ASSERT_TRUE(reader.ok()) << reader.status();
  int answered = 0, asked = 0;
  while (true) {
    auto next = (*reader)->Next();
    ASSERT_TRUE(next.ok()) << next.status();
    if (!next->has_value()) break;
    auto example = formatter->Format(**next);
    ASSERT_TRUE(example.ok()) << example.status();
    std::vector<int64_t> ids;
    for (size_t i = 0; i < example->input_ids.size() && example->labels[i] == kNotTrained; ++i) {
      ids.push_back(example->input_ids[i]);
    }
    const std::string answer = (*next)->messages.back().content;
    std::vector<int32_t> generated;
    ForwardOptions forward;
    forward.adapter = &*adapter;
    forward.logits = LogitsMode::kLast;
    for (int step = 0; step < 32; ++step) {
      ForwardBatch batch;
      batch.input_ids = torch::tensor(ids, torch::kLong).unsqueeze(0);
      auto logits = (*nf4)->Forward(batch, nullptr, forward);
      ASSERT_TRUE(logits.ok()) << logits.status();
      const int32_t next_id = static_cast<int32_t>(logits->argmax(-1).item<int64_t>());
      if (tokenizer_->IsEos(next_id)) break;
      generated.push_back(next_id);
      ids.push_back(next_id);
    }
    const std::string text = tokenizer_->Decode(generated, /*skip_special_tokens=*/true);
    ++asked;
    if (text.find(answer) != std::string::npos) ++answered;
    std::cout << "[learn] " << (text.find(answer) != std::string::npos ? "ok  " : "miss")
              << " want \"" << answer << "\" got \"" << text << "\"\n";
  }
  EXPECT_EQ(asked, 16);
  EXPECT_GE(answered, 14) << "of " << asked << " training questions answered";
}

// The shutdown's Interrupt: steps go on without their periodic evaluations (which may take
// minutes), so a checkpoint comes at the next step boundary; the training itself is unchanged.
TEST_F(TrainerTest, InterruptSkipsEvaluationsButNotTraining) {
  TrainingJobConfig config = StoppingEarlyConfig("interrupted");
  config.learning_rate = 5e-3;  // no divergence: every step would evaluate and go on
  config.eval_every = 1;
  config.early_stopping_patience = 0;
  config.max_steps = 4;
  std::vector<TrainingEvent> events;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { events.push_back(e); });
  ASSERT_TRUE(t.ok()) << t.status();
  auto evals = [&] {
    int n = 0;
    for (const auto& e : events) n += e.kind == TrainingEvent::Kind::kEval;
    return n;
  };
  // An evaluation runs a validation micro-batch per Step(), after its step.
  while (evals() < 2) ASSERT_TRUE((*t)->Step().ok());
  EXPECT_EQ((*t)->step(), 2);
  (*t)->Interrupt();
  while ((*t)->step() < 3) ASSERT_TRUE((*t)->Step().ok());
  EXPECT_EQ(evals(), 2) << "an interrupted job evaluates no more";
  ASSERT_TRUE((*t)->at_step_boundary());
  ASSERT_TRUE((*t)->SaveCheckpoint().ok());
  EXPECT_EQ(Losses(events).size(), 3u);
}

TEST_F(TrainerTest, EvaluatesAndStopsEarly) {
  TrainingJobConfig config = StoppingEarlyConfig("eval");
  std::vector<TrainingEvent> events;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { events.push_back(e); });
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->validation_rows(), 4);
  EXPECT_EQ((*t)->train_rows(), 12);
  ASSERT_TRUE((*t)->Run().ok());
  int evals = 0;
  for (const auto& e : events) evals += e.kind == TrainingEvent::Kind::kEval;
  EXPECT_GE(evals, 2);
  ASSERT_EQ(events.back().kind, TrainingEvent::Kind::kFinished);
  EXPECT_TRUE(events.back().summary.early_stopped);
  // The held-out report: validation loss and ROUGE of greedy answers, also on disk.
  const TrainingSummary& summary = events.back().summary;
  ASSERT_TRUE(summary.has_eval_report);
  EXPECT_GT(summary.eval_loss, 0);
  for (double r : {summary.rouge.rouge1, summary.rouge.rouge2, summary.rouge.rouge_l}) {
    EXPECT_GE(r, 0);
    EXPECT_LE(r, 1);
  }
  std::ifstream report_file(summary.eval_report_path);
  ASSERT_TRUE(report_file) << summary.eval_report_path;
  const auto report = nlohmann::json::parse(report_file);
  EXPECT_EQ(report["answered"].get<int>(), 4);
  EXPECT_EQ(report["held_out"].get<int>(), 4);
  EXPECT_EQ(summary.answered, 4);
  EXPECT_EQ(summary.adapter_step, summary.steps);
  EXPECT_EQ(report["examples"].size(), 4u);
  EXPECT_DOUBLE_EQ(report["rougeL"].get<double>(), summary.rouge.rouge_l);
  for (const auto& example : report["examples"]) {  // the template's end of turn is cut off
    const std::string reference = example["reference"], prediction = example["prediction"];
    EXPECT_FALSE(reference.empty());
    EXPECT_EQ(reference.find("<|im_end|>"), std::string::npos) << reference;
    EXPECT_EQ(prediction.find("<|im_end|>"), std::string::npos) << prediction;
  }
  EXPECT_TRUE(events.back().summary.best_is_eval);
  EXPECT_LT(events.back().summary.steps, 40);
  // transformers' train_loss: the mean of the step losses. The runtime is the training loop's,
  // as its train_runtime: what the last step's checkpoint recorded, not the held-out answers
  // after it.
  const std::vector<double> losses = Losses(events);
  double sum = 0;
  for (double l : losses) sum += l;
  EXPECT_NEAR(summary.train_loss, sum / static_cast<double>(losses.size()), 1e-12);
  EXPECT_EQ(summary.final_loss, losses.back());
  const auto state = nlohmann::json::parse(
      ReadFile((fs::path(config.output_dir) / ("checkpoint-" + std::to_string(summary.steps)) /
                "trainer_state.json")
                   .string()));
  EXPECT_EQ(summary.runtime_s, state["train_seconds"].get<double>());
}

// Patience that runs out at the last step stops nothing: a job that ran every step is not
// reported as stopped early (the same run, given as many steps as it ran when it did stop early).
TEST_F(TrainerTest, PatienceRunningOutOnTheLastStepIsNotAnEarlyStop) {
  const auto run = [&](const std::string& sub, int64_t max_steps) {
    TrainingJobConfig config = StoppingEarlyConfig(sub);
    config.schedule = "constant";  // the same learning rates whatever max_steps is
    config.warmup_steps = 0;
    config.max_steps = max_steps;
    std::vector<TrainingEvent> events;
    auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                             [&](const TrainingEvent& e) { events.push_back(e); });
    EXPECT_TRUE(t.ok()) << t.status();
    EXPECT_TRUE((*t)->Run().ok());
    EXPECT_EQ(events.back().kind, TrainingEvent::Kind::kFinished);
    return events.back().summary;
  };
  const TrainingSummary stopped = run("patience-40", 40);
  ASSERT_TRUE(stopped.early_stopped);
  ASSERT_LT(stopped.steps, 40);
  const TrainingSummary ran_out = run("patience-last", stopped.steps);
  EXPECT_EQ(ran_out.steps, stopped.steps);
  EXPECT_FALSE(ran_out.early_stopped) << "the job ran all its " << ran_out.steps << " steps";
}

// load_best_at_end: a job stopped early (its last evaluation was no better) publishes the adapter
// of its best evaluation, not the last step's weights (its final checkpoint).
TEST_F(TrainerTest, LoadBestAtEndPublishesTheBestEvaluationsAdapter) {
  TrainingJobConfig config = StoppingEarlyConfig("best");
  config.load_best_at_end = true;
  std::vector<TrainingEvent> events;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { events.push_back(e); });
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->Run().ok());
  const TrainingSummary& summary = events.back().summary;
  ASSERT_TRUE(summary.early_stopped);
  auto published = LoraAdapter::ReadPeft(summary.adapter_path);
  auto best = LoraAdapter::ReadPeft(config.output_dir + "/best-adapter");
  auto last = LoraAdapter::ReadPeft(CheckpointPath(config.output_dir, summary.steps) + "/adapter");
  ASSERT_TRUE(published.ok() && best.ok() && last.ok()) << last.status();
  bool equals_best = true, equals_last = true;
  for (const auto& [path, pair] : published->layers) {
    equals_best &= torch::equal(pair.b, best->layers.at(path).b);
    equals_last &= torch::equal(pair.b, last->layers.at(path).b);
  }
  EXPECT_TRUE(equals_best);
  EXPECT_FALSE(equals_last);
  // The held-out report scores the published weights: its loss is the best evaluation's (the
  // same forward over the same rows), and it names that evaluation's step.
  const TrainingEvent* best_eval = nullptr;
  for (const auto& e : events) {
    if (e.kind == TrainingEvent::Kind::kEval && e.eval.loss == summary.best_loss) best_eval = &e;
  }
  ASSERT_NE(best_eval, nullptr);
  EXPECT_LT(best_eval->eval.step, summary.steps);
  ASSERT_TRUE(summary.has_eval_report);
  EXPECT_NEAR(summary.eval_loss, summary.best_loss, 1e-6 * summary.best_loss);
  std::ifstream report_file(summary.eval_report_path);
  ASSERT_TRUE(report_file) << summary.eval_report_path;
  const auto report = nlohmann::json::parse(report_file);
  EXPECT_EQ(report["adapter_step"].get<int64_t>(), best_eval->eval.step);
  EXPECT_EQ(summary.adapter_step, best_eval->eval.step);
  EXPECT_EQ(report["step"].get<int64_t>(), summary.steps);
}

// A held-out conversation is answered from its first trained assistant turn, and the reference is
// that turn alone: also when the end-of-turn marker is a special token (decoding drops it, as
// ChatML models mark it), and when the loss covers the whole example (response_only off).
// A model whose chat template lorad cannot render: "auto" formats Alpaca records with the
// Alpaca prompt as ever, but refuses conversations rather than silently Alpaca-format them (the
// model has a template of its own that chat requests would then not match).
TEST_F(TrainerTest, AutoRefusesConversationsForAModelTemplateLoradCannotRender) {
  const fs::path zephyr = ModelWithTokenizerConfig("zephyr-template", [](nlohmann::json& tc) {
    tc["chat_template"] =
        "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";
  });
  auto formatter = ExampleFormatter::Create(*tokenizer_, zephyr.string(), {});
  ASSERT_TRUE(formatter.ok()) << formatter.status();
  auto qa = DatasetReader::ParseRecord(R"({"question": "Capital of Peru?", "answer": "Lima."})",
                                       DatasetFormat::kAuto, "test");
  ASSERT_TRUE(qa.ok()) << qa.status();
  auto refused = formatter->Format(*qa);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("set dataset.template to alpaca or raw"),
            std::string::npos)
      << refused.status();
  auto alpaca = DatasetReader::ParseRecord(R"({"instruction": "Add 2 and 3.", "output": "5"})",
                                           DatasetFormat::kAuto, "test");
  ASSERT_TRUE(alpaca.ok()) << alpaca.status();
  EXPECT_TRUE(formatter->Format(*alpaca).ok());
}

// Held-out rows answered together (their prompts in one padded forward, then a token of each per
// forward) give each one's answer alone, in as many forwards as the longest answer takes; a group
// holds as many rows as its token budget allows.
TEST_F(TrainerTest, HeldOutRowsAnsweredTogetherGiveEachOnesAnswerAlone) {
  auto examples = ReadDataset(std::string(LORAD_SOURCE_DIR) + "/tests/fixtures/qa_small.jsonl");
  ASSERT_TRUE(examples.ok()) << examples.status();
  auto formatter = ExampleFormatter::Create(*tokenizer_, model_dir_, ExampleFormatterOptions());
  ASSERT_TRUE(formatter.ok()) << formatter.status();
  std::vector<TokenizedExample> rows;
  for (size_t i = 0; i < 5; ++i) {
    auto row = formatter->Format((*examples)[i]);
    ASSERT_TRUE(row.ok()) << row.status();
    rows.push_back(*std::move(row));
  }
  ASSERT_NE(rows[0].response_start, rows[1].response_start) << "prompts of different lengths";
  LoraConfig lora;
  lora.r = 4;
  auto adapter = LoraAdapter::Init(model_->config(), lora, 3);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  torch::manual_seed(3);
  for (auto& [path, pair] : adapter->layers) pair.b = 0.3 * torch::randn_like(pair.b);
  constexpr int64_t kNew = 12;
  std::vector<AnsweredExample> alone;
  for (const TokenizedExample& row : rows) {
    auto answered = AnswerExample(*model_, *adapter, *tokenizer_, row, kNew, "");
    ASSERT_TRUE(answered.ok() && answered->has_value()) << answered.status();
    alone.push_back(**answered);
  }
  size_t next = 0;
  auto group = ExampleAnswerer::NextGroup(*model_, rows, &next, 32, kNew, 1 << 20);
  ASSERT_EQ(group.size(), rows.size());
  EXPECT_EQ(next, rows.size());
  auto answerer = ExampleAnswerer::Start(*model_, *tokenizer_, group, kNew, "");
  ASSERT_TRUE(answerer.ok()) << answerer.status();
  int64_t forwards = 0;
  std::optional<std::vector<AnsweredExample>> together;
  while (!together) {
    auto answered = answerer->Advance(*adapter);
    ASSERT_TRUE(answered.ok()) << answered.status();
    ++forwards;
    together = *std::move(answered);
  }
  ASSERT_EQ(together->size(), rows.size());
  int64_t longest = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ((*together)[i].prediction, alone[i].prediction) << "row " << i;
    EXPECT_EQ((*together)[i].generated_tokens, alone[i].generated_tokens) << "row " << i;
    EXPECT_EQ((*together)[i].line, rows[i].line);
    longest = std::max(longest, alone[i].generated_tokens);
  }
  EXPECT_EQ(forwards, longest);
  // A budget of two rows' tokens: groups of two, then the last row alone.
  next = 0;
  const int64_t two = 2 * (std::max(rows[0].response_start, rows[1].response_start) + kNew);
  EXPECT_EQ(ExampleAnswerer::NextGroup(*model_, rows, &next, 32, kNew, two).size(), 2u);
  EXPECT_EQ(ExampleAnswerer::NextGroup(*model_, rows, &next, 2, kNew, 1 << 20).size(), 2u);
  EXPECT_EQ(ExampleAnswerer::NextGroup(*model_, rows, &next, 32, kNew, 1).size(), 1u);
  EXPECT_TRUE(ExampleAnswerer::NextGroup(*model_, rows, &next, 32, kNew, 1 << 20).empty());
}

TEST_F(TrainerTest, HeldOutAnswersAreTheFirstTurnWhateverTheLossCovers) {
  const fs::path special = ModelWithTokenizerConfig("special-markers", [](nlohmann::json& tc) {
    tc["added_tokens_decoder"] = {{"3", {{"content", "<|im_start|>"}, {"special", true}}},
                                  {"4", {{"content", "<|im_end|>"}, {"special", true}}}};
  });
  auto tokenizer = LoadTokenizer(special.string());
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  ASSERT_EQ((*tokenizer)->Piece(4), "<|im_end|>");
  auto example = DatasetReader::ParseRecord(
      R"({"messages": [{"role": "user", "content": "Capital of Austria?"},
          {"role": "assistant", "content": "Vienna is the capital."},
          {"role": "user", "content": "And of Peru?"},
          {"role": "assistant", "content": "Lima."}]})",
      DatasetFormat::kChat, "test");
  ASSERT_TRUE(example.ok()) << example.status();
  LoraConfig lora;
  lora.r = 4;
  lora.target_modules = {"q_proj"};
  auto adapter = LoraAdapter::Init(model_->config(), lora, 1);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  int64_t start = -1;
  for (bool response_only : {true, false}) {
    ExampleFormatterOptions options;
    options.response_only = response_only;
    auto formatter = ExampleFormatter::Create(**tokenizer, special.string(), options);
    ASSERT_TRUE(formatter.ok()) << formatter.status();
    auto row = formatter->Format(*example);
    ASSERT_TRUE(row.ok()) << row.status();
    EXPECT_GT(row->response_start, 0);
    if (start >= 0) {
      EXPECT_EQ(row->response_start, start) << "the same start either way";
    }
    start = row->response_start;
    auto answers = EvaluateAnswers(*model_, *adapter, **tokenizer, {*row}, 1, 4, "<|im_end|>");
    ASSERT_TRUE(answers.ok()) << answers.status();
    ASSERT_EQ(answers->examples.size(), 1u) << "response_only " << response_only;
    EXPECT_EQ(answers->examples[0].reference, "Vienna is the capital.");
  }
}

TEST_F(TrainerTest, ValidationLossOfTheLastStepIsReportedWithoutACadence) {
  TrainingJobConfig config = Config("final-eval");
  config.data.validation_fraction = 0.25;
  config.max_steps = 3;
  std::vector<TrainingEvent> events;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { events.push_back(e); });
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->Run().ok());
  std::vector<const TrainingEvent*> evals;
  for (const auto& e : events) {
    if (e.kind == TrainingEvent::Kind::kEval) evals.push_back(&e);
  }
  ASSERT_EQ(evals.size(), 1u);
  EXPECT_EQ(evals[0]->eval.step, 3);
  const TrainingSummary& summary = events.back().summary;
  EXPECT_DOUBLE_EQ(evals[0]->eval.loss, summary.eval_loss);
  EXPECT_TRUE(summary.best_is_eval);
  EXPECT_DOUBLE_EQ(summary.best_loss, summary.eval_loss);
}

// The GPU loop serves between Step() calls: an evaluation runs one validation micro-batch a call
// and the end one held-out answer a call, instead of all of it in the call of the last step.
TEST_F(TrainerTest, EvaluationsAndTheEndRunAPieceAStep) {
  TrainingJobConfig config = Config("pieces");
  config.data.validation_fraction = 0.25;  // 4 of the 16 examples
  config.micro_batch_size = 1;
  config.grad_accum = 1;
  config.eval_every = 2;
  config.max_steps = 2;
  std::vector<TrainingEvent> events;
  std::vector<size_t> events_after_call;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { events.push_back(e); });
  ASSERT_TRUE(t.ok()) << t.status();
  while (!(*t)->done()) {
    // Not while the end waits for a write on its thread (Step() would do nothing): every call
    // counted does a piece of work.
    while (auto until = (*t)->idle_until()) std::this_thread::sleep_until(*until);
    ASSERT_TRUE((*t)->Step().ok());
    events_after_call.push_back(events.size());
  }
  auto call_of = [&](TrainingEvent::Kind kind) {  // the Step() call that emitted it
    for (size_t e = 0; e < events.size(); ++e) {
      if (events[e].kind != kind) continue;
      for (size_t c = 0; c < events_after_call.size(); ++c) {
        if (events_after_call[c] > e) return static_cast<int64_t>(c);
      }
    }
    return int64_t{-1};
  };
  // Calls 0 and 1 train steps 1 and 2; 2..5 evaluate the 4 validation rows, the last of them
  // then starts the checkpoint's write; 6 reports it written and runs the first held-out prompt;
  // then a call per generated token (the first token of each later answer comes with its
  // prompt); and a call writes the report and starts the adapter's write, a last one ends.
  EXPECT_EQ(call_of(TrainingEvent::Kind::kEval), 5);
  EXPECT_EQ(call_of(TrainingEvent::Kind::kCheckpoint), 6);
  const TrainingSummary& summary = events.back().summary;
  EXPECT_EQ(summary.answered, 4);
  std::ifstream report_file(summary.eval_report_path);
  const auto report = nlohmann::json::parse(report_file);
  int64_t generated = 0;
  for (const auto& example : report["examples"]) {
    const int64_t tokens = example["prediction_tokens"].get<int64_t>();
    EXPECT_GE(tokens, 1);
    EXPECT_LE(tokens, 128);
    generated += tokens;
  }
  EXPECT_EQ(static_cast<int64_t>(events_after_call.size()), 7 + (generated - 1) + 2);
  // The pieces add up to the evaluation the held-out report holds.
  for (const auto& e : events) {
    if (e.kind == TrainingEvent::Kind::kEval) {
      EXPECT_DOUBLE_EQ(e.eval.loss, summary.eval_loss);
    }
  }
}

TEST_F(TrainerTest, DivergenceStopsTheJobAtTheFirstNonFiniteLoss) {
  TrainingJobConfig config = Config("diverge");
  config.lora.alpha = 1e6;  // the largest scale allowed: no update survives it
  config.learning_rate = 1.0;
  config.max_grad_norm = 0;  // no clipping to hide it
  config.warmup_steps = 0;
  std::vector<TrainingEvent> events;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config,
                           [&](const TrainingEvent& e) { events.push_back(e); });
  ASSERT_TRUE(t.ok()) << t.status();
  absl::Status status;
  for (int i = 0; i < 200 && status.ok() && !(*t)->done(); ++i) status = (*t)->Step();
  ASSERT_FALSE(status.ok()) << "steps at alpha 1e6 and lr 1 should diverge";
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(status.message().find("diverged"), std::string::npos) << status;
  EXPECT_NE(status.message().find("learning_rate"), std::string::npos) << status;
  // The steps (the last one non-finite, reported so the curve shows it), then the failure.
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events.back().kind, TrainingEvent::Kind::kFailed);
  EXPECT_EQ(events.back().error, status.message());
  const TrainingEvent& last_step = events[events.size() - 2];
  ASSERT_EQ(last_step.kind, TrainingEvent::Kind::kStep);
  EXPECT_FALSE(std::isfinite(last_step.step.loss) && std::isfinite(last_step.step.grad_norm));
  for (size_t i = 0; i + 2 < events.size(); ++i) {
    EXPECT_TRUE(std::isfinite(events[i].step.loss)) << "it stops at the first non-finite step";
  }
  EXPECT_FALSE(fs::exists(fs::path(config.output_dir) / "adapter"));
}

TEST_F(TrainerTest, KeepsTheNewestCheckpointsOnly) {
  for (int64_t keep : {2, 0}) {
    TrainingJobConfig config = Config("keep-" + std::to_string(keep));
    config.max_steps = 9;
    config.save_every = 2;
    config.keep_checkpoints = keep;
    auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_TRUE((*t)->Run().ok());
    std::set<std::string> names;
    for (const auto& entry : fs::directory_iterator(config.output_dir)) {
      const std::string name = entry.path().filename().string();
      if (name.find("checkpoint") != std::string::npos) names.insert(name);
    }
    const std::set<std::string> expected =
        keep == 2 ? std::set<std::string>{"checkpoint-8", "checkpoint-9"}
                  : std::set<std::string>{"checkpoint-2", "checkpoint-4", "checkpoint-6",
                                          "checkpoint-8", "checkpoint-9"};
    EXPECT_EQ(names, expected) << "keep_checkpoints " << keep;
  }
}

// Steps as transformers' Trainer counts them: 16 examples in micro-batches of 2 are 8 a pass;
// with grad_accum 3 a pass is steps of 3, 3 and 2 micro-batches (no step runs into the next pass),
// and 1.5 passes are ceil(1.5 * 3) = 5 steps.
TEST_F(TrainerTest, StepsFollowEpochsAsTransformersTrainerCountsThem) {
  for (const auto& [epochs, want] : std::vector<std::pair<double, std::vector<double>>>{
           {1.0, {0.375, 0.75, 1.0}}, {1.5, {0.375, 0.75, 1.0, 1.375, 1.75}}}) {
    SCOPED_TRACE(epochs);
    TrainingJobConfig config = Config("epochs-" + std::to_string(epochs));
    config.max_steps = 0;
    config.num_epochs = epochs;
    config.grad_accum = 3;
    std::vector<double> seen;
    auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config, [&](const TrainingEvent& e) {
      if (e.kind == TrainingEvent::Kind::kStep) {
        seen.push_back(e.step.epoch);
        EXPECT_EQ(e.step.total_steps, static_cast<int64_t>(want.size()));
      }
    });
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_TRUE((*t)->Run().ok());
    EXPECT_EQ(seen, want);
  }
}

// warmup_ratio 0.25 of 8 steps is ceil(2.0) = 2 warmup steps: the learning rates of warmup_steps 2.
TEST_F(TrainerTest, WarmupRatioIsAShareOfTheSteps) {
  auto rates = [&](const std::string& sub, int64_t warmup_steps, double warmup_ratio) {
    TrainingJobConfig config = Config(sub);
    config.max_steps = 8;
    config.warmup_steps = warmup_steps;
    config.warmup_ratio = warmup_ratio;
    std::vector<double> lr;
    auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config, [&](const TrainingEvent& e) {
      if (e.kind == TrainingEvent::Kind::kStep) lr.push_back(e.step.learning_rate);
    });
    EXPECT_TRUE(t.ok() && (*t)->Run().ok());
    return lr;
  };
  const std::vector<double> by_ratio = rates("ratio", 0, 0.25);
  ASSERT_EQ(by_ratio.size(), 8u);
  EXPECT_EQ(by_ratio, rates("steps", 2, 0));
  EXPECT_NE(by_ratio, rates("none", 0, 0));
}

TEST_F(TrainerTest, BadDatasetLineIsNamed) {
  fs::create_directories(out_);
  const std::string path = (out_ / "bad.jsonl").string();
  std::ofstream(path) << "{\"question\": \"a\", \"answer\": \"b\"}\n{\"question\": 3}\n";
  TrainingJobConfig config = Config("bad");
  config.data.path = path;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find(":2"), std::string::npos) << t.status();
}

TEST_F(TrainerTest, InvalidConfigNamesTheField) {
  TrainingJobConfig config = Config("invalid");
  config.grad_accum = 0;
  auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config, nullptr);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("grad_accum"), std::string::npos) << t.status();
}

// Which template a merged export carries: a family the job named (llama3 here) where it is not
// the model folder's own (ChatML), as published; the folder's own where the job trained on it;
// and the folder's too for a job named alpaca on a sentencepiece tokenizer, whose published
// template (the BOS written as text) tokenizes otherwise than the job trained (the tokenizer's
// BOS, then the first word with its space).
TEST_F(TrainerTest, AMergedExportCarriesTheTemplateTheJobTrainedOnWhereItTokenizesAlike) {
  const auto exported_template = [&](const std::string& sub, const std::string& template_name) {
    TrainingJobConfig config = Config(sub);
    config.max_steps = 1;
    config.export_merged_dtype = "float32";
    config.data.template_name = template_name;
    auto t = Trainer::Create(*model_, *tokenizer_, model_dir_, config, [](const TrainingEvent&) {});
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok() || !(*t)->Run().ok()) return std::string("(not run)");
    std::ifstream in(fs::path(config.output_dir) / "merged" / "tokenizer_config.json");
    return nlohmann::json::parse(in)["chat_template"].get<std::string>();
  };
  std::ifstream own_config(fs::path(model_dir_) / "tokenizer_config.json");
  const std::string own = nlohmann::json::parse(own_config)["chat_template"].get<std::string>();
  EXPECT_EQ(exported_template("named", "llama3"), ChatTemplate::PublishedJinja("llama3"));
  EXPECT_EQ(exported_template("own", "auto"), own);
  EXPECT_EQ(exported_template("alpaca", "alpaca"), own);
}

}  // namespace
}  // namespace lorad::engine
