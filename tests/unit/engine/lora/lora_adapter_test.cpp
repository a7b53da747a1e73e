#include "engine/lora/lora_adapter.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "engine/lora/merged_model_writer.h"
#include "engine/model/chat_template.h"
#include "engine/model/safetensors.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// The tiny fixture model's shape (tests/fixtures/make_tiny_model.py), with grouped-query
// attention so k/v differ from q.
ModelConfig TinyModel() {
  ModelConfig m;
  m.architecture = "LlamaForCausalLM";
  m.vocab_size = 512;
  m.hidden_size = 128;
  m.intermediate_size = 352;
  m.num_hidden_layers = 2;
  m.num_attention_heads = 4;
  m.num_key_value_heads = 2;
  m.head_dim = 32;
  return m;
}

LoraConfig Config(int r, std::vector<std::string> targets = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"}) {
  LoraConfig c;
  c.r = r;
  c.alpha = 2.0 * r;
  c.target_modules = std::move(targets);
  return c;
}

class LoraAdapterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) / "lora_adapter_test" /
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }

  // A PEFT-style folder with the given adapter_config.json and tensors (name -> tensor).
  std::string WriteFolder(const std::string& name, const std::string& config_json,
                          const std::vector<std::pair<std::string, torch::Tensor>>& tensors) {
    const fs::path folder = dir_ / name;
    fs::create_directories(folder);
    std::ofstream(folder / "adapter_config.json") << config_json;
    std::vector<TensorView> views;
    std::vector<torch::Tensor> keep;
    for (const auto& [key, t] : tensors) {
      keep.push_back(t.contiguous());
      TensorView v;
      v.name = key;
      switch (t.scalar_type()) {
        case torch::kFloat32:
          v.dtype = DType::kF32;
          break;
        case torch::kBFloat16:
          v.dtype = DType::kBF16;
          break;
        case torch::kInt32:
          v.dtype = DType::kI32;
          break;
        default:
          ADD_FAILURE() << "dtype not handled in the test";
      }
      v.shape = t.sizes().vec();
      v.data = static_cast<const uint8_t*>(keep.back().data_ptr());
      v.nbytes = keep.back().nbytes();
      views.push_back(v);
    }
    EXPECT_TRUE(WriteSafetensors((folder / "adapter_model.safetensors").string(), views).ok());
    return folder.string();
  }

  // adapter_config.json for r=4 targeting q_proj, with `extra` fields merged in.
  static std::string ConfigText(const std::string& extra = "") {
    return R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"])" +
           (extra.empty() ? "" : ", " + extra) + "}";
  }

  static std::vector<std::pair<std::string, torch::Tensor>> QProjWeights(
      const std::string& suffix = "weight") {
    return {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A." + suffix,
             torch::ones({4, 128})},
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_B." + suffix,
             torch::full({128, 4}, 0.5f)}};
  }

  void ExpectReadError(const std::string& folder, const std::string& what) {
    auto adapter = LoraAdapter::ReadPeft(folder);
    ASSERT_FALSE(adapter.ok()) << "read a bad adapter: " << folder;
    EXPECT_THAT(std::string(adapter.status().message()), HasSubstr(what));
  }

  fs::path dir_;
};

TEST_F(LoraAdapterTest, InitFollowsPeftShapesAndInitialisation) {
  const ModelConfig model = TinyModel();
  auto adapter = LoraAdapter::Init(model, Config(8), /*seed=*/1);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  ASSERT_EQ(adapter->layers.size(), 2u * 7u);
  const std::map<std::string, std::pair<int64_t, int64_t>> in_out = {
      {"q_proj", {128, 128}},   {"k_proj", {128, 64}},     {"v_proj", {128, 64}},
      {"o_proj", {128, 128}},   {"gate_proj", {128, 352}}, {"up_proj", {128, 352}},
      {"down_proj", {352, 128}}};
  for (int layer = 0; layer < 2; ++layer) {
    for (const auto& [proj, io] : in_out) {
      const std::string sub = proj.size() == 6 ? "self_attn" : "mlp";  // q, k, v, o_proj
      const std::string path = "model.layers." + std::to_string(layer) + "." + sub + "." + proj;
      ASSERT_TRUE(adapter->layers.count(path)) << path;
      const LoraPair& p = adapter->layers.at(path);
      EXPECT_EQ(p.a.sizes().vec(), (std::vector<int64_t>{8, io.first})) << path;
      EXPECT_EQ(p.b.sizes().vec(), (std::vector<int64_t>{io.second, 8})) << path;
      EXPECT_EQ(p.a.scalar_type(), torch::kFloat32);
      // B = 0: the adapted model starts equal to the base model.
      EXPECT_EQ(p.b.abs().max().item<float>(), 0.0f) << path;
      // A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_ with a = sqrt(5)); std = bound/sqrt(3).
      const double bound = 1.0 / std::sqrt(double(io.first));
      EXPECT_LE(p.a.abs().max().item<double>(), bound) << path;
      EXPECT_NEAR(p.a.std().item<double>(), bound / std::sqrt(3.0), 0.1 * bound) << path;
      EXPECT_NEAR(p.a.mean().item<double>(), 0.0, 0.1 * bound) << path;
    }
  }
  EXPECT_EQ(adapter->bytes(),
            2 * 4 * 8 *
                (128 + 128 + 128 + 64 + 128 + 64 + 128 + 128 + 128 + 352 + 128 + 352 + 352 + 128));
}

TEST_F(LoraAdapterTest, InitIsDeterministicFromTheSeed) {
  auto a = LoraAdapter::Init(TinyModel(), Config(4, {"q_proj", "down_proj"}), 7);
  auto b = LoraAdapter::Init(TinyModel(), Config(4, {"down_proj", "q_proj"}), 7);
  auto c = LoraAdapter::Init(TinyModel(), Config(4, {"q_proj", "down_proj"}), 8);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  ASSERT_EQ(a->layers.size(), 4u);
  for (const auto& [path, pair] : a->layers) {
    EXPECT_TRUE(torch::equal(pair.a, b->layers.at(path).a)) << path;
    EXPECT_FALSE(torch::equal(pair.a, c->layers.at(path).a)) << path;
  }
}

TEST_F(LoraAdapterTest, InitRejectsAnInvalidConfig) {
  auto adapter = LoraAdapter::Init(TinyModel(), Config(0), 1);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(std::string(adapter.status().message()), HasSubstr("'r'"));
}

TEST_F(LoraAdapterTest, WriteThenReadGivesTheSameAdapter) {
  LoraConfig config = Config(4, {"v_proj", "gate_proj"});
  config.alpha = 12.5;
  config.dropout = 0.05;
  config.use_rslora = true;
  config.base_model_name_or_path = "meta-llama/Llama-3.2-1B";
  auto adapter = LoraAdapter::Init(TinyModel(), config, 3);
  ASSERT_TRUE(adapter.ok());
  for (auto& [path, pair] : adapter->layers) pair.b = torch::randn_like(pair.b);
  const std::string folder = (dir_ / "out" / "adapter").string();
  ASSERT_TRUE(adapter->WritePeft(folder).ok());

  auto read = LoraAdapter::ReadPeft(folder);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->config.r, 4);
  EXPECT_EQ(read->config.alpha, 12.5);
  EXPECT_EQ(read->config.dropout, 0.05);
  EXPECT_TRUE(read->config.use_rslora);
  EXPECT_EQ(read->config.base_model_name_or_path, "meta-llama/Llama-3.2-1B");
  EXPECT_EQ(read->config.target_modules, config.target_modules);
  ASSERT_EQ(read->layers.size(), adapter->layers.size());
  for (const auto& [path, pair] : adapter->layers) {
    ASSERT_TRUE(read->layers.count(path)) << path;
    EXPECT_TRUE(torch::equal(read->layers.at(path).a, pair.a)) << path;
    EXPECT_TRUE(torch::equal(read->layers.at(path).b, pair.b)) << path;
  }
  EXPECT_TRUE(read->ValidateAgainst(TinyModel()).ok());
  // Only the folder itself: the temporary folder was renamed into place.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_ / "out"), fs::directory_iterator()), 1);
}

// An adapter of some layers only (PEFT's layers_to_transform) keeps that list through a read and
// a write: PEFT then adapts the same layers (a job that continues it writes it back).
TEST_F(LoraAdapterTest, LayersToTransformSurviveAWriteAndARead) {
  LoraConfig config = Config(4, {"q_proj"});
  config.layers_to_transform = {1};
  auto adapter = LoraAdapter::Init(TinyModel(), config, 3);
  ASSERT_TRUE(adapter.ok());
  ASSERT_EQ(adapter->layers.size(), 1u);
  EXPECT_EQ(adapter->layers.begin()->first, "model.layers.1.self_attn.q_proj");
  const std::string folder = (dir_ / "layers" / "adapter").string();
  ASSERT_TRUE(adapter->WritePeft(folder).ok());
  auto read = LoraAdapter::ReadPeft(folder);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->config.layers_to_transform, std::vector<int64_t>{1});
  ASSERT_TRUE(read->WritePeft(folder).ok());
  std::ifstream in(folder + "/adapter_config.json");
  const nlohmann::json written = nlohmann::json::parse(in);
  EXPECT_EQ(written["layers_to_transform"], nlohmann::json::array({1}));
}

// PEFT's exclude_modules (names matched whole or at a '.'-boundary end, or one regex the whole
// module path must match): those modules are not adapted by Init, a tensor of one is refused as
// PEFT would leave it unused, and the field survives a write and a read.
TEST_F(LoraAdapterTest, ExcludeModulesLeaveModulesOutAndSurviveAWriteAndARead) {
  LoraConfig config = Config(4, {"q_proj", "v_proj"});
  config.exclude_modules = {"layers.0.self_attn.q_proj", "v_proj"};
  EXPECT_TRUE(config.Excludes("model.layers.0.self_attn.q_proj"));
  EXPECT_FALSE(config.Excludes("model.layers.10.self_attn.q_proj"));
  EXPECT_FALSE(config.Excludes("model.layers.1.self_attn.q_proj"));
  EXPECT_TRUE(config.Excludes("model.layers.1.self_attn.v_proj"));
  EXPECT_FALSE(config.Excludes("model.layers.1.self_attn.kv_proj"));  // not at a '.' boundary
  auto adapter = LoraAdapter::Init(TinyModel(), config, 3);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  ASSERT_EQ(adapter->layers.size(), 1u);
  EXPECT_EQ(adapter->layers.begin()->first, "model.layers.1.self_attn.q_proj");

  const std::string folder = (dir_ / "excluded" / "adapter").string();
  ASSERT_TRUE(adapter->WritePeft(folder).ok());
  auto read = LoraAdapter::ReadPeft(folder);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->config.exclude_modules, config.exclude_modules);
  std::ifstream in(folder + "/adapter_config.json");
  EXPECT_EQ(nlohmann::json::parse(in)["exclude_modules"],
            nlohmann::json::array({"layers.0.self_attn.q_proj", "v_proj"}));

  // One regular expression, matched against the whole module path.
  LoraConfig regex = Config(4, {"q_proj"});
  regex.exclude_modules_regex = R"(model\.layers\.[0]\..*)";
  auto only_layer_1 = LoraAdapter::Init(TinyModel(), regex, 3);
  ASSERT_TRUE(only_layer_1.ok()) << only_layer_1.status();
  ASSERT_EQ(only_layer_1->layers.size(), 1u);
  EXPECT_EQ(only_layer_1->layers.begin()->first, "model.layers.1.self_attn.q_proj");
  EXPECT_FALSE(regex.Excludes("layers.0.self_attn.q_proj"));  // a full match, not a search

  // A file holding weights of a module it excludes: refused (PEFT would leave them unused).
  ExpectReadError(WriteFolder("excluded-weights", ConfigText(R"("exclude_modules": ["q_proj"])"),
                              QProjWeights()),
                  "which exclude_modules in adapter_config.json leaves out");
  ExpectReadError(
      WriteFolder("bad-regex", ConfigText(R"("exclude_modules": "(unclosed")"), QProjWeights()),
      "field 'exclude_modules'");
  ExpectReadError(
      WriteFolder("bad-type", ConfigText(R"("exclude_modules": {"q_proj": 1})"), QProjWeights()),
      "field 'exclude_modules' must be");
}

TEST_F(LoraAdapterTest, WriteReplacesAnAdapterButNeverAnotherFolder) {
  auto first = LoraAdapter::Init(TinyModel(), Config(4, {"q_proj"}), 1);
  auto second = LoraAdapter::Init(TinyModel(), Config(2, {"o_proj"}), 2);
  ASSERT_TRUE(first.ok() && second.ok());
  const std::string folder = (dir_ / "adapter").string();
  ASSERT_TRUE(first->WritePeft(folder).ok());
  ASSERT_TRUE(second->WritePeft(folder + "/").ok());  // trailing slash names the same folder
  auto read = LoraAdapter::ReadPeft(folder);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->config.r, 2);
  EXPECT_EQ(read->config.target_modules, std::vector<std::string>{"o_proj"});
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);

  const fs::path precious = dir_ / "precious";
  fs::create_directories(precious);
  std::ofstream(precious / "notes.txt") << "keep me";
  auto s = first->WritePeft(precious.string());
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("refusing to replace"));
  EXPECT_TRUE(fs::exists(precious / "notes.txt"));
}

TEST_F(LoraAdapterTest, WriteRejectsShapesThatDoNotMatchR) {
  auto adapter = LoraAdapter::Init(TinyModel(), Config(4, {"q_proj"}), 1);
  ASSERT_TRUE(adapter.ok());
  adapter->layers.begin()->second.b = torch::zeros({128, 3});
  auto s = adapter->WritePeft((dir_ / "a").string());
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("q_proj.lora_B.weight has shape [128, 3]"));
  EXPECT_TRUE(fs::is_empty(dir_));
}

TEST_F(LoraAdapterTest, ReadAcceptsAdapterNamesInKeysAllLinearAndBf16) {
  auto weights = QProjWeights("default.weight");
  weights[1].second = weights[1].second.to(torch::kBFloat16);
  const std::string folder = WriteFolder("named", R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                              "target_modules": "all-linear", "rank_pattern": {}, "bias": "none"})",
                                         weights);
  auto adapter = LoraAdapter::ReadPeft(folder);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  const LoraPair& p = adapter->layers.at("model.layers.0.self_attn.q_proj");
  EXPECT_EQ(p.b.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::equal(p.b, torch::full({128, 4}, 0.5f)));
  EXPECT_EQ(adapter->config.target_modules, KnownLoraTargets());
}

// What PEFT serves exactly as plain LoRA (checked with PEFT 0.21: get_peft_model on the tiny
// model) is read: bias "all" / "lora_only" with no bias in the file (Llama has none),
// fan_in_fan_out (PEFT turns it off for Linear layers), names that match no Llama module beside
// ones that do (PEFT ignores them). A trained bias in the file is refused, naming it.
TEST_F(LoraAdapterTest, ReadsWhatPeftServesAsPlainLoraAndRefusesATrainedBias) {
  for (const std::string extra :
       {R"("bias": "all")", R"("bias": "lora_only")", R"("fan_in_fan_out": true)",
        R"("target_modules": ["query_key_value", "q_proj"])",
        R"("layers_to_transform": [0], "layers_pattern": "")",  // "" is any pattern
        R"("exclude_modules": [""])"}) {                        // "" matches no module
    SCOPED_TRACE(extra);
    const std::string folder = WriteFolder("plain",
                                           R"({"peft_type": "LORA", "r": 4,
        "lora_alpha": 8, "target_modules": ["q_proj"], )" +
                                               extra + "}",
                                           QProjWeights());
    auto adapter = LoraAdapter::ReadPeft(folder);
    ASSERT_TRUE(adapter.ok()) << adapter.status();
    EXPECT_EQ(adapter->config.target_modules, std::vector<std::string>{"q_proj"});
    fs::remove_all(folder);
  }
  auto weights = QProjWeights();
  weights.push_back({"base_model.model.model.layers.0.self_attn.q_proj.bias", torch::ones({128})});
  ExpectReadError(WriteFolder("bias", ConfigText(R"("bias": "all")"), weights),
                  "is a trained bias (PEFT's bias \"all\" or \"lora_only\")");
}

// target_modules naming more than a projection picks modules as PEFT does (a path equal to a
// name, or ending with "." and it): a tensor of another module is refused (PEFT leaves it
// unused), Init adapts only the named ones, and the names are written back as read.
TEST_F(LoraAdapterTest, TargetNamesWithAPathPickTheirModulesAsPeftDoes) {
  auto w = QProjWeights();  // layer 0's q_proj
  ExpectReadError(WriteFolder("other-layer",
                              ConfigText(R"("target_modules": ["layers.1.self_attn.q_proj"])"), w),
                  "adapts model.layers.0.self_attn.q_proj, which target_modules in "
                  "adapter_config.json does not name (it names layers.1.self_attn.q_proj)");
  ExpectReadError(WriteFolder("mlp", ConfigText(R"("target_modules": ["mlp.q_proj"])"), w),
                  "does not name (it names mlp.q_proj)");
  const std::string folder = WriteFolder(
      "named", ConfigText(R"("target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"])"), w);
  auto adapter = LoraAdapter::ReadPeft(folder);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ(adapter->config.target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(adapter->config.target_names,
            (std::vector<std::string>{"model.layers.0.self_attn.q_proj", "v_proj"}));
  auto init = LoraAdapter::Init(TinyModel(), adapter->config, 1);
  ASSERT_TRUE(init.ok()) << init.status();
  std::vector<std::string> paths;
  for (const auto& [path, pair] : init->layers) paths.push_back(path);
  EXPECT_EQ(paths, (std::vector<std::string>{"model.layers.0.self_attn.q_proj",
                                             "model.layers.0.self_attn.v_proj",
                                             "model.layers.1.self_attn.v_proj"}));
  const std::string rewritten = (dir_ / "rewritten").string();
  ASSERT_TRUE(adapter->WritePeft(rewritten).ok());
  std::ifstream in(rewritten + "/adapter_config.json");
  EXPECT_EQ(nlohmann::json::parse(in)["target_modules"],
            nlohmann::json::array({"model.layers.0.self_attn.q_proj", "v_proj"}));

  // A module named by its whole path is adapted whatever layers_to_transform lists (PEFT 0.21:
  // layer 1's q_proj beside layer 0's v_proj); it was refused on read and left out by Init.
  LoraConfig layered = adapter->config;
  layered.target_names = {"model.layers.1.self_attn.q_proj", "v_proj"};
  layered.layers_to_transform = {0};
  auto both = LoraAdapter::Init(TinyModel(), layered, 2);
  ASSERT_TRUE(both.ok()) << both.status();
  paths.clear();
  for (const auto& [path, pair] : both->layers) paths.push_back(path);
  EXPECT_EQ(paths, (std::vector<std::string>{"model.layers.0.self_attn.v_proj",
                                             "model.layers.1.self_attn.q_proj"}));
  const std::string layered_folder = (dir_ / "layered").string();
  ASSERT_TRUE(both->WritePeft(layered_folder).ok());
  auto reread = LoraAdapter::ReadPeft(layered_folder);
  ASSERT_TRUE(reread.ok()) << reread.status();
  EXPECT_EQ(reread->layers.size(), 2u);
}

// Fields PEFT writes switched off: an empty list, false, or (trainable_token_indices, a dict of
// layers) an empty dict. Read as plain LoRA.
TEST_F(LoraAdapterTest, VariantFieldsSwitchedOffAreRead) {
  for (const std::string extra :
       {R"("trainable_token_indices": {})", R"("trainable_token_indices": [])",
        R"("layer_replication": null)", R"("use_bdlora": false)", R"("kasa_config": null)",
        // Trained with PEFT's whole dropout range: it does not apply in inference.
        R"("lora_dropout": 1.0)"}) {
    SCOPED_TRACE(extra);
    const std::string folder = WriteFolder("off", ConfigText(extra), QProjWeights());
    auto read = LoraAdapter::ReadPeft(folder);
    EXPECT_TRUE(read.ok()) << read.status();
  }
}

TEST_F(LoraAdapterTest, ReadErrorsNameTheFolderFileAndField) {
  ExpectReadError((dir_ / "absent").string(), "does not exist");
  fs::create_directories(dir_ / "empty");
  ExpectReadError((dir_ / "empty").string(), "has no adapter_config.json");
  struct Case {
    std::string config;
    std::string what;
  };
  const std::vector<Case> cases = {
      {"not json", "adapter_config.json: not valid JSON: [json.exception.parse_error.101]"},
      {R"({"r": 4,})", "not valid JSON"},
      {"[1, 2]", "adapter_config.json: not a JSON object"},
      {R"({"r": 4})", "'peft_type' is missing"},
      {R"({"peft_type": "IA3", "target_modules": ["q_proj"]})", "'IA3'"},
      {R"({"peft_type": "LORA", "r": 4, "target_modules": ".*attn.*"})",
       "pattern '.*attn.*'; lorad does not read regex targets"},
      {R"({"peft_type": "LORA", "r": 4, "target_modules": ["c_attn"]})",
       "([\"c_attn\"]) names no module lorad can adapt"},
      // PEFT reads a string as a regular expression over whole paths: "q_proj" matches none.
      {R"({"peft_type": "LORA", "r": 4, "target_modules": "q_proj"})",
       "write the list [\"q_proj\"]"},
      // layers_pattern: PEFT finds no layer index with "h" in model.layers.<i> paths.
      {ConfigText(R"("layers_to_transform": [0], "layers_pattern": "h")"),
       "this model's layers are 'layers'"},
      {ConfigText(R"("layers_pattern": "layers")"), "without layers_to_transform"},
      {R"({"peft_type": "LORA", "r": 4, "target_modules": "all-linear",
          "layers_to_transform": [0]})",
       "'layers_to_transform' cannot be used when 'target_modules' is a string"},
      {ConfigText(R"("velora_config": {"rank": 2})"), "'velora_config'"},
      {R"({"peft_type": "LORA", "r": 4})", "'target_modules' is missing"},
      {ConfigText(R"("rank_pattern": {"q_proj": 8})"), "has shape [4, 128] but r is 8"},
      {ConfigText(R"("rank_pattern": {"q_proj": 2.5})"), "ranks are whole numbers"},
      // Scales that overflow the activations (NaN output), as training refuses them.
      {R"({"peft_type": "LORA", "r": 4, "lora_alpha": 1e308, "target_modules": ["q_proj"]})",
       "'lora_alpha' must be in (0, 1e+06]"},
      // Past a double's range: the parser's out_of_range, which escaped as an exception.
      {R"({"peft_type": "LORA", "r": 4, "lora_alpha": 1e400, "target_modules": ["q_proj"]})",
       "adapter_config.json: not valid JSON: [json.exception.out_of_range.406] number overflow"},
      {ConfigText(R"("alpha_pattern": {"q_proj": -1e308})"), "alphas are in (0, 1e+06]"},
      {ConfigText(R"("bias": "sometimes")"), "'bias'"},
      {ConfigText(R"("use_dora": true)"), "'use_dora'"},
      {ConfigText(R"("modules_to_save": ["lm_head"])"), "'modules_to_save'"},
      // Served as plain LoRA these would differ from PEFT (activated LoRA, reordered layers,
      // inits that change the base).
      {ConfigText(R"("alora_invocation_tokens": [5, 6])"), "'alora_invocation_tokens'"},
      {ConfigText(R"("layer_replication": [[1, 2], [0, 1]])"), "'layer_replication'"},
      {ConfigText(R"("target_parameters": ["q_proj.weight"])"), "'target_parameters'"},
      {ConfigText(R"("use_bdlora": {"nblocks": 2})"), "'use_bdlora'"},
      // An empty sub-config turns the variant on in PEFT (its defaults), KaSA changing the base.
      {ConfigText(R"("kasa_config": {})"), "'kasa_config' is {}"},
      // LoRA on lm_head / embed_tokens: refused by the field, not by a tensor name.
      {R"({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "lm_head"]})",
       "field 'target_modules' names 'lm_head'"},
      {ConfigText(R"("trainable_token_indices": [3])"), "'trainable_token_indices'"},
      {ConfigText(R"("init_lora_weights": "pissa_niter_4")"),
       "'init_lora_weights' is \"pissa_niter_4\": that init changes the base weights"},
      {ConfigText(R"("init_lora_weights": "olora")"), "path_initial_model_for_weight_conversion"},
      {ConfigText(R"("init_lora_weights": "OLoRA")"), "\"OLoRA\": that init changes the base"},
      {R"({"peft_type": "LORA", "r": 0, "target_modules": ["q_proj"]})", "'r' must be in"},
      {R"({"peft_type": "LORA", "r": "4", "target_modules": ["q_proj"]})", "'r' must be an"},
      {ConfigText(R"("lora_dropout": 1.5)"), "'dropout'"},
      // Nested a million levels deep: refused before it is parsed (printing it recursed).
      {ConfigText("\"modules_to_save\": " + std::string(1000000, '[') + std::string(1000000, ']')),
       "adapter_config.json: JSON nested more than 64 levels deep"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].config);
    const std::string folder =
        WriteFolder("c" + std::to_string(i), cases[i].config, QProjWeights());
    ExpectReadError(folder, folder);
    ExpectReadError(folder, cases[i].what);
  }
}

// rank_pattern / alpha_pattern: the module with the smaller rank is padded with zeros and its
// own scaling (alpha 2 / r 2 = 1) folded into B against the adapter's (alpha 8 / r 4 = 2).
TEST_F(LoraAdapterTest, PerModuleRanksAndAlphasBecomeOneRankAndScale) {
  auto w = QProjWeights();
  w.push_back(
      {"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", torch::ones({2, 128})});
  w.push_back({"base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
               torch::full({32, 2}, 0.5f)});
  const std::string folder = WriteFolder(
      "patterns",
      R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
          "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers\\.0\\.self_attn\\.v_proj": 2}})",
      w);
  auto adapter = LoraAdapter::ReadPeft(folder);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_TRUE(adapter->from_patterns);
  EXPECT_EQ(adapter->config.r, 4);
  const LoraPair& v = adapter->layers.at("model.layers.0.self_attn.v_proj");
  ASSERT_EQ(v.a.sizes(), (std::vector<int64_t>{4, 128}));
  ASSERT_EQ(v.b.sizes(), (std::vector<int64_t>{32, 4}));
  // scaling() * B' A' equals the module's own 1.0 * B A.
  const torch::Tensor own = torch::full({32, 2}, 0.5f).matmul(torch::ones({2, 128}));
  EXPECT_TRUE(torch::allclose(adapter->config.scaling() * v.b.matmul(v.a), own));
  EXPECT_EQ(v.a.slice(0, 2).abs().sum().item<float>(), 0.0f);
  // The q_proj module keeps the adapter's own rank and scaling: untouched.
  const LoraPair& q = adapter->layers.at("model.layers.0.self_attn.q_proj");
  EXPECT_TRUE(torch::equal(q.b, torch::full({128, 4}, 0.5f)));
  ExpectReadError(WriteFolder("bad_pattern", ConfigText(R"("rank_pattern": {"q_proj(": 4})"), w),
                  "'rank_pattern': 'q_proj(' is not a regular expression");
}

// A rank_pattern with ranks far apart would pad the small modules to hundreds of megabytes (one
// rank-1024 module beside rank-1 ones of a wide layer): refused with the sizes, before any
// padding is allocated.
TEST_F(LoraAdapterTest, RankPatternsThatWouldPadToHundredsOfMegabytesAreRefused) {
  const std::vector<std::pair<std::string, torch::Tensor>> w = {
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch::zeros({1024, 128})},
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", torch::zeros({128, 1024})},
      {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", torch::zeros({1, 32768})},
      {"base_model.model.model.layers.0.mlp.down_proj.lora_B.weight", torch::zeros({32768, 1})}};
  const std::string folder =
      WriteFolder("far_apart",
                  R"({"peft_type": "LORA", "r": 1, "target_modules": ["q_proj", "down_proj"],
          "rank_pattern": {"q_proj": 1024}})",
                  w);
  ExpectReadError(folder,
                  "pads every module to the largest (1024, 'model.layers.0.self_attn.q_proj'; the "
                  "smallest is 1), which would make this adapter 269.5 MB instead of 1.3 MB");
  // The same modules with ranks 4 apart: served, padded.
  const std::vector<std::pair<std::string, torch::Tensor>> near = {
      {w[0].first, torch::zeros({4, 128})},
      {w[1].first, torch::zeros({128, 4})},
      {w[2].first, torch::zeros({1, 32768})},
      {w[3].first, torch::zeros({32768, 1})}};
  auto adapter = LoraAdapter::ReadPeft(WriteFolder(
      "near", R"({"peft_type": "LORA", "r": 1, "target_modules": ["q_proj", "down_proj"],
                  "rank_pattern": {"q_proj": 4}})",
      near));
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ(adapter->layers.at("model.layers.0.mlp.down_proj").a.sizes(),
            (std::vector<int64_t>{4, 32768}));
}

TEST_F(LoraAdapterTest, ReadErrorsOnBadWeights) {
  auto w = QProjWeights();
  ExpectReadError(WriteFolder("no_b", ConfigText(), {w[0]}), "has no matching lora_B");
  ExpectReadError(WriteFolder("no_a", ConfigText(), {w[1]}), "has no matching lora_A");
  ExpectReadError(WriteFolder("none", ConfigText(), {}), "holds no LoRA weights");
  ExpectReadError(
      WriteFolder("bad_key", ConfigText(), {w[0], w[1], {"model.norm.weight", w[0].second}}),
      "'model.norm.weight' is not a LoRA weight");
  ExpectReadError(
      WriteFolder("embed", ConfigText(),
                  {{"base_model.model.model.embed_tokens.lora_A.weight", torch::ones({4, 8})}}),
      "not a LoRA target lorad supports");
  ExpectReadError(WriteFolder("untargeted", ConfigText(),
                              {w[0],
                               w[1],
                               {"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
                                torch::ones({4, 128})}}),
                  "adapts k_proj, which target_modules");
  // layers_to_transform: PEFT leaves a tensor of another layer unused, so it is refused.
  ExpectReadError(WriteFolder("other_layer", ConfigText(R"("layers_to_transform": [1])"), w),
                  "adapts layer 0, which layers_to_transform");
  ExpectReadError(WriteFolder("bad_layers", ConfigText(R"("layers_to_transform": "all")"), w),
                  "'layers_to_transform' must be a layer index or a list");
  for (const char* listed : {"0", "[0, 1]", "null"}) {
    auto read = LoraAdapter::ReadPeft(
        WriteFolder("layers", ConfigText(std::string(R"("layers_to_transform": )") + listed), w));
    EXPECT_TRUE(read.ok()) << listed << ": " << read.status();
  }
  ExpectReadError(
      WriteFolder("int", ConfigText(), {{w[0].first, torch::ones({4, 128}, torch::kInt32)}, w[1]}),
      "has dtype I32");
  ExpectReadError(WriteFolder("rank", ConfigText(), {{w[0].first, torch::ones({5, 128})}, w[1]}),
                  "has shape [5, 128] but r is 4");
  ExpectReadError(
      WriteFolder("nan", ConfigText(), {{w[0].first, torch::full({4, 128}, NAN)}, w[1]}), "NaN");
  ExpectReadError(
      WriteFolder("twice", ConfigText(),
                  {w[0],
                   w[1],
                   {w[0].first.substr(0, w[0].first.size() - 6) + "default.weight", w[0].second}}),
      "two lora_A tensors");
  const fs::path pickle = dir_ / "pickle";
  fs::create_directories(pickle);
  std::ofstream(pickle / "adapter_config.json") << ConfigText();
  std::ofstream(pickle / "adapter_model.bin") << "pickle";
  ExpectReadError(pickle.string(), "does not read pickle files");
  EXPECT_TRUE(absl::IsFailedPrecondition(LoraAdapter::ReadPeft(pickle.string()).status()))
      << "the weights are there, in a form lorad does not read: not a wrong path";
  // A resized vocabulary (PEFT's save_embedding_layers): the whole head and embedding, named.
  ExpectReadError(
      WriteFolder("resized", ConfigText(),
                  {w[0], w[1], {"base_model.model.lm_head.weight", torch::ones({520, 128})}}),
      "is a whole lm_head weight of shape [520, 128]");
  ExpectReadError(
      WriteFolder(
          "embedded", ConfigText(),
          {w[0], w[1], {"base_model.model.model.embed_tokens.weight", torch::ones({520, 128})}}),
      "save_embedding_layers=False");
}

TEST_F(LoraAdapterTest, ValidateAgainstNamesTensorShapeAndExpectedShape) {
  auto adapter = LoraAdapter::Init(TinyModel(), Config(8), 1);
  ASSERT_TRUE(adapter.ok());
  EXPECT_TRUE(adapter->ValidateAgainst(TinyModel()).ok());

  ModelConfig wider = TinyModel();
  wider.hidden_size = 256;
  wider.head_dim = 64;
  auto s = adapter->ValidateAgainst(wider);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight has shape "
                        "[128, 8] but the base model's down_proj needs [256, 8]"));

  ModelConfig shallow = TinyModel();
  shallow.num_hidden_layers = 1;
  s = adapter->ValidateAgainst(shallow);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("model.layers.1."));
  EXPECT_THAT(std::string(s.message()), HasSubstr("1 layers"));

  // A base of more layers: the adapter lacks the last one's modules (PEFT would leave them at
  // their fresh init, unadapted, with a warning).
  ModelConfig deeper = TinyModel();
  deeper.num_hidden_layers = 3;
  s = adapter->ValidateAgainst(deeper);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("the adapter has no LoRA weights for model.layers.2.self_attn.q_proj and 6 "
                        "more modules, which its target_modules adapt in this base model (3 "
                        "layers)"));
  // ... unless its config adapts only the layers it has (PEFT's layers_to_transform).
  LoraAdapter first_layers = *adapter;
  first_layers.config.layers_to_transform = {0, 1};
  EXPECT_TRUE(first_layers.ValidateAgainst(deeper).ok());

  ModelConfig mha = TinyModel();  // 4 KV heads instead of 2: k/v outputs double
  mha.num_key_value_heads = 4;
  s = adapter->ValidateAgainst(mha);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("k_proj.lora_B.weight has shape [64, 8]"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("needs [128, 8]"));
}

// A merged export over one already there (a resumed job's, a retry after a full disk) replaces it
// whole, in one swap, and leaves no temp folder behind.
TEST(MergedModelWriterTest, AnExportOverAnEarlierOneReplacesIt) {
  const std::string base = std::getenv("LORAD_TINY_MODEL");
  auto model = ModelConfig::LoadFromFolder(base);
  ASSERT_TRUE(model.ok()) << model.status();
  const fs::path dir = fs::path(::testing::TempDir()) / "merged-replace";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path out = dir / "merged";
  std::string first_bytes;
  for (float fill : {0.5f, -0.25f}) {
    auto adapter = LoraAdapter::Init(*model, Config(2), 7);
    ASSERT_TRUE(adapter.ok()) << adapter.status();
    for (auto& [path, pair] : adapter->layers) pair.b.fill_(fill);
    const absl::Status written = WriteMergedModel(base, *adapter, out.string(), "float32");
    ASSERT_TRUE(written.ok()) << written;
    std::ifstream in(out / "model.safetensors", std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_FALSE(bytes.empty());
    if (first_bytes.empty()) {
      first_bytes = bytes;
    } else {
      EXPECT_NE(bytes, first_bytes) << "the second export did not replace the first";
    }
    EXPECT_TRUE(fs::exists(out / "config.json"));
    EXPECT_FALSE(fs::exists(dir / "merged.tmp")) << "the temp folder (or the old export) is left";
  }
}

// The job's template in the export: tokenizer_config.json's chat_template and
// chat_template.jinja hold the family's published Jinja, and the end of turn joins the EOS ids
// of generation_config.json, made from config.json's ids where the base has none (transformers'
// from_model_config: the export's generate then stopped only at the EOS).
TEST(MergedModelWriterTest, TheJobsTemplateAndItsEndOfTurnAreWritten) {
  const std::string fixture = std::getenv("LORAD_TINY_MODEL");
  auto model = ModelConfig::LoadFromFolder(fixture);
  ASSERT_TRUE(model.ok()) << model.status();
  auto adapter = LoraAdapter::Init(*model, Config(2), 7);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  const fs::path dir = fs::path(::testing::TempDir()) / "merged-template";
  fs::remove_all(dir);
  const auto read_json = [](const fs::path& file) {
    std::ifstream in(file);
    return nlohmann::json::parse(in);
  };
  const nlohmann::json config = read_json(fs::path(fixture) / "config.json");
  for (const bool has_generation_config : {true, false}) {
    const fs::path base = dir / (has_generation_config ? "base" : "base-without");
    fs::create_directories(base);
    for (const auto& f : fs::directory_iterator(fixture)) {
      if (f.path().filename() == "generation_config.json" && !has_generation_config) continue;
      fs::copy(f.path(), base / f.path().filename());
    }
    const fs::path out = base.string() + "-merged";
    const absl::Status written =
        WriteMergedModel(base.string(), *adapter, out.string(), "auto", nullptr, {"llama3", 4});
    ASSERT_TRUE(written.ok()) << written;
    const std::string jinja(ChatTemplate::PublishedJinja("llama3"));
    EXPECT_EQ(read_json(out / "tokenizer_config.json")["chat_template"], jinja);
    std::ifstream in(out / "chat_template.jinja");
    EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), jinja);
    const nlohmann::json generation = read_json(out / "generation_config.json");
    EXPECT_EQ(generation["eos_token_id"], nlohmann::json::array({config["eos_token_id"], 4}))
        << has_generation_config;
    if (!has_generation_config) {
      EXPECT_EQ(generation["bos_token_id"], config["bos_token_id"]);
    }
  }
}

}  // namespace
}  // namespace lorad::engine
