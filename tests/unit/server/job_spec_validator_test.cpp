// ResolveInitAdapter: the adapter a job continues is found among the served ones, its settings
// fill an unset `lora` and must agree with a given one, and its folder is fingerprinted (one that
// changed since it was loaded is refused).
#include "server/job_spec_validator.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "engine/lora/peft_config.h"

namespace lorad::server {
namespace {

namespace fs = std::filesystem;

class ResolveInitAdapterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // A folder per test: ctest runs this fixture's tests as separate processes, two at once.
    folder_ = fs::path(::testing::TempDir()) /
              (std::string("resolve_init_adapter-") +
               ::testing::UnitTest::GetInstance()->current_test_info()->name() + "-" +
               std::to_string(getpid())) /
              "qa";
    fs::remove_all(folder_);
    fs::create_directories(folder_);
    engine::LoraConfig config;
    config.r = 8;
    config.alpha = 32;
    config.dropout = 0.05;
    config.target_modules = {"q_proj", "v_proj"};
    std::ofstream(folder_ / "adapter_config.json") << engine::PeftConfigJson(config);
    // Only its bytes matter here (the fingerprint); the trainer reads the weights.
    std::ofstream(folder_ / "adapter_model.safetensors") << "weights";
    auto fingerprint = engine::PeftFolderFingerprint(folder_.string());
    ASSERT_TRUE(fingerprint.ok()) << fingerprint.status();
    served_ = {{"qa", 3, folder_.string(), folder_.string(), true, *fingerprint},
               {"gone", 1, folder_.string(), folder_.string(), false, ""}};
  }
  // Adds a served adapter `name` (version 1) of `config`, in a folder of its own.
  void Serve(const std::string& name, const engine::LoraConfig& config) {
    const fs::path folder = folder_.parent_path() / name;
    fs::create_directories(folder);
    std::ofstream(folder / "adapter_config.json") << engine::PeftConfigJson(config);
    std::ofstream(folder / "adapter_model.safetensors") << "weights";
    auto fingerprint = engine::PeftFolderFingerprint(folder.string());
    ASSERT_TRUE(fingerprint.ok()) << fingerprint.status();
    served_.push_back({name, 1, folder.string(), folder.string(), true, *fingerprint});
  }
  lorad::v1::JobSpec Spec(const std::string& init) const {
    lorad::v1::JobSpec spec;
    spec.set_adapter_name("next");
    spec.set_init_adapter(init);
    spec.set_init_adapter_path("/etc");  // the server's to set
    return spec;
  }
  fs::path folder_;
  std::vector<ServedAdapter> served_;
};

TEST_F(ResolveInitAdapterTest, AnUnsetLoraTakesTheAdaptersSettings) {
  lorad::v1::JobSpec spec = Spec("qa");
  ASSERT_TRUE(ResolveInitAdapter(spec, served_).ok());
  EXPECT_EQ(spec.init_adapter_path(), folder_.string());
  EXPECT_EQ(spec.init_adapter_version(), 3);
  EXPECT_EQ(spec.init_adapter_fingerprint(), served_[0].fingerprint);
  EXPECT_EQ(spec.lora().r(), 8);
  EXPECT_EQ(spec.lora().alpha(), 32);
  EXPECT_DOUBLE_EQ(spec.lora().dropout(), 0.05);
  EXPECT_EQ(std::vector<std::string>(spec.lora().target_modules().begin(),
                                     spec.lora().target_modules().end()),
            (std::vector<std::string>{"q_proj", "v_proj"}));

  lorad::v1::JobSpec none = Spec("");
  none.clear_init_adapter_path();
  ASSERT_TRUE(ResolveInitAdapter(none, served_).ok());
  EXPECT_FALSE(none.has_lora());
}

// What SubmitJob fills in, sent by a client: a path or version without init_adapter is refused
// (the job would have trained a new adapter from scratch), a version the adapter no longer
// serves too (it was replaced by the current one, and the job trained from another version than
// its spec said); the version served is taken.
TEST_F(ResolveInitAdapterTest, WhatSubmitFillsInIsRefusedWhenItDisagrees) {
  lorad::v1::JobSpec path_alone = Spec("");
  const absl::Status s = ResolveInitAdapter(path_alone, served_);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("name the adapter to continue with init_adapter"), std::string::npos)
      << s;
  lorad::v1::JobSpec older = Spec("qa");
  older.set_init_adapter_version(1);
  const absl::Status v = ResolveInitAdapter(older, served_);
  EXPECT_TRUE(absl::IsFailedPrecondition(v)) << v;
  EXPECT_NE(
      v.message().find("init_adapter_version: 1 was asked, but adapter 'qa' serves version 3"),
      std::string::npos)
      << v;
  lorad::v1::JobSpec current = Spec("qa");
  current.set_init_adapter_version(3);
  ASSERT_TRUE(ResolveInitAdapter(current, served_).ok());
  EXPECT_EQ(current.init_adapter_path(), folder_.string()) << "a client's path is not kept";
}

TEST_F(ResolveInitAdapterTest, AGivenLoraMustAgreeAndEachErrorNamesItsField) {
  lorad::v1::JobSpec same = Spec("qa");
  same.mutable_lora()->set_r(8);
  same.mutable_lora()->add_target_modules("v_proj");
  same.mutable_lora()->add_target_modules("q_proj");
  EXPECT_TRUE(ResolveInitAdapter(same, served_).ok());

  const auto refused = [&](const std::function<void(lorad::v1::LoraSpec&)>& set) {
    lorad::v1::JobSpec spec = Spec("qa");
    set(*spec.mutable_lora());
    return ResolveInitAdapter(spec, served_);
  };
  absl::Status s = refused([](auto& l) { l.set_r(16); });
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("lora.r: 16, but init_adapter 'qa' has 8"), std::string::npos) << s;
  s = refused([](auto& l) { l.set_alpha(16); });
  EXPECT_NE(s.message().find("lora.alpha"), std::string::npos) << s;
  s = refused([](auto& l) { l.set_dropout(0.1); });
  EXPECT_NE(s.message().find("lora.dropout"), std::string::npos) << s;
  s = refused([](auto& l) { l.add_target_modules("o_proj"); });
  EXPECT_NE(s.message().find("lora.target_modules"), std::string::npos) << s;
  s = refused([](auto& l) { l.set_use_rslora(true); });
  EXPECT_NE(s.message().find("lora.use_rslora"), std::string::npos) << s;
}

// "all-linear" (PEFT's and TRL's, which a job file may already say) is the seven projections:
// taken for an adapter on all of them (it was refused as naming other modules), refused for one
// on fewer.
TEST_F(ResolveInitAdapterTest, AllLinearIsTheSevenProjections) {
  engine::LoraConfig config;
  config.target_modules = engine::KnownLoraTargets();
  ASSERT_NO_FATAL_FAILURE(Serve("all", config));
  lorad::v1::JobSpec spec = Spec("all");
  spec.mutable_lora()->add_target_modules("All-Linear");
  const absl::Status taken = ResolveInitAdapter(spec, served_);
  EXPECT_TRUE(taken.ok()) << taken;
  EXPECT_EQ(spec.lora().target_modules_size(), 7);
  lorad::v1::JobSpec fewer = Spec("qa");
  fewer.mutable_lora()->add_target_modules("all-linear");
  const absl::Status refused = ResolveInitAdapter(fewer, served_);
  EXPECT_NE(refused.message().find("lora.target_modules"), std::string::npos) << refused;
}

// PEFT trains (and lorad serves) dropout up to 1, which drops every LoRA input: continuing such an
// adapter would train nothing, and is refused naming the adapter.
TEST_F(ResolveInitAdapterTest, AnAdapterOfDropoutOneIsServedButNotTrainedFurther) {
  engine::LoraConfig config;
  config.dropout = 1.0;
  ASSERT_TRUE(config.Validate().ok());
  ASSERT_NO_FATAL_FAILURE(Serve("dropped", config));
  lorad::v1::JobSpec spec = Spec("dropped");
  const absl::Status s = ResolveInitAdapter(spec, served_);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_NE(s.message().find("init_adapter: adapter 'dropped' has lora_dropout 1"),
            std::string::npos)
      << s;
  EXPECT_NE(s.message().find("up to 0.99"), std::string::npos) << s;
}

TEST_F(ResolveInitAdapterTest, AnAdapterNotServedOrChangedSinceItWasLoadedIsRefused) {
  for (const char* name : {"gone", "never"}) {
    lorad::v1::JobSpec spec = Spec(name);
    const absl::Status s = ResolveInitAdapter(spec, served_);
    EXPECT_TRUE(absl::IsNotFound(s)) << s;
    EXPECT_NE(s.message().find("is not served"), std::string::npos) << s;
  }
  std::ofstream(folder_ / "adapter_model.safetensors") << "other weights";
  lorad::v1::JobSpec spec = Spec("qa");
  const absl::Status s = ResolveInitAdapter(spec, served_);
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  EXPECT_NE(s.message().find("holds other files than when it was loaded"), std::string::npos) << s;
}

}  // namespace
}  // namespace lorad::server
