// LoadAdapter over real gRPC (AdapterService in process, the tiny fixture model's engine on the
// CPU, a JobStore recording what is loaded).
#include "server/adapter_service.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/lora/peft_config.h"
#include "engine/model/safetensors.h"
#include "engine/runtime/engine.h"
#include "lorad/v1/adapters.grpc.pb.h"
#include "server/job_store.h"

namespace lorad::server {
namespace {

namespace fs = std::filesystem;

// A folder rewritten while LoadAdapter reads it (here between the read and the record, through
// the hook the service holds there) is refused, nothing is recorded or served; loaded again, it is
// recorded with the fingerprint of the files that serve. Before, the fingerprint was taken after
// the read: the record named the new files while the old ones served, and a restart served the
// new ones as that version.
TEST(AdapterServiceTest, AFolderRewrittenWhileItIsReadIsRefusedAndNothingIsRecorded) {
  const fs::path dir = fs::path(::testing::TempDir()) / "adapter_service_test-rewritten";
  fs::remove_all(dir);
  fs::create_directories(dir / "adapters");
  engine::EngineOptions options;
  const char* model = std::getenv("LORAD_TINY_MODEL");
  options.model_folder = model != nullptr ? model : LORAD_TINY_MODEL_DEFAULT;
  options.device = "cpu";
  auto started = engine::Engine::Start(options);
  ASSERT_TRUE(started.ok()) << started.status();
  std::unique_ptr<engine::Engine> engine = *std::move(started);
  auto store = JobStore::Open((dir / "jobs.db").string());
  ASSERT_TRUE(store.ok()) << store.status();

  // A PEFT adapter on layer 0's q_proj (the fixture's hidden size 128, rank 2), zeros.
  const fs::path folder = dir / "adapters" / "bot";
  fs::create_directories(folder);
  std::ofstream(folder / "adapter_config.json")
      << R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],)"
      << R"( "layers_to_transform": [0]})";
  const std::vector<float> zeros(2 * 128, 0.0f);
  const auto* bytes = reinterpret_cast<const uint8_t*>(zeros.data());
  const std::string path = "base_model.model.model.layers.0.self_attn.q_proj.";
  ASSERT_TRUE(
      engine::WriteSafetensors(
          (folder / "adapter_model.safetensors").string(),
          {{path + "lora_A.weight", engine::DType::kF32, {2, 128}, bytes, zeros.size() * 4},
           {path + "lora_B.weight", engine::DType::kF32, {128, 2}, bytes, zeros.size() * 4}})
          .ok());

  bool rewrite = true;
  std::mutex held;
  AdapterService service(*engine, (dir / "adapters").string(), nullptr, store->get(), nullptr, [&] {
    if (rewrite) {  // the operator copies a retrained adapter in
      std::ofstream(folder / "adapter_config.json", std::ios::app) << " ";
      rewrite = false;
    }
    return std::unique_lock<std::mutex>(held);
  });
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  auto stub = lorad::v1::AdapterService::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));

  lorad::v1::LoadAdapterRequest request;
  request.set_name("bot");
  request.set_path("bot");
  lorad::v1::Adapter reply;
  {
    grpc::ClientContext context;
    const grpc::Status s = stub->LoadAdapter(&context, request, &reply);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::ABORTED) << s.error_message();
    EXPECT_NE(s.error_message().find("changed while it was read"), std::string::npos)
        << s.error_message();
  }
  auto recorded = (*store)->Adapters();
  ASSERT_TRUE(recorded.ok()) << recorded.status();
  EXPECT_TRUE(recorded->empty());
  EXPECT_TRUE(engine->adapters().List().empty());

  grpc::ClientContext context;
  const grpc::Status s = stub->LoadAdapter(&context, request, &reply);
  ASSERT_TRUE(s.ok()) << s.error_message();
  recorded = (*store)->Adapters();
  ASSERT_TRUE(recorded.ok()) << recorded.status();
  ASSERT_EQ(recorded->size(), 1u);
  EXPECT_EQ((*recorded)[0].fingerprint, *engine::PeftFolderFingerprint(folder.string()));
  server->Shutdown(std::chrono::system_clock::now());
  engine->Stop();
}

}  // namespace
}  // namespace lorad::server
