// LoadAdapter over real gRPC (AdapterService in process, the tiny fixture model's engine on the
// CPU, a JobStore recording what is loaded).
#include "server/adapter_service.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/lora/peft_config.h"
#include "engine/model/safetensors.h"
#include "engine/runtime/engine.h"
#include "lorad/v1/adapters.grpc.pb.h"
#include "server/blocking_calls.h"
#include "server/job_store.h"

namespace lorad::server {
namespace {

namespace fs = std::filesystem;

// The tiny fixture model's engine on the CPU, a JobStore, and a PEFT adapter folder "bot" in the
// adapter root (layer 0's q_proj, the fixture's hidden size 128, rank 2, zeros).
class AdapterServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("adapter_service_test-" +
            std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "adapters");
    engine::EngineOptions options;
    const char* model = std::getenv("LORAD_TINY_MODEL");
    options.model_folder = model != nullptr ? model : LORAD_TINY_MODEL_DEFAULT;
    options.device = "cpu";
    auto started = engine::Engine::Start(options);
    ASSERT_TRUE(started.ok()) << started.status();
    engine_ = *std::move(started);
    auto store = JobStore::Open((dir_ / "jobs.db").string());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);

    folder_ = dir_ / "adapters" / "bot";
    fs::create_directories(folder_);
    std::ofstream(folder_ / "adapter_config.json")
        << R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],)"
        << R"( "layers_to_transform": [0]})";
    const std::vector<float> zeros(2 * 128, 0.0f);
    const auto* bytes = reinterpret_cast<const uint8_t*>(zeros.data());
    const std::string path = "base_model.model.model.layers.0.self_attn.q_proj.";
    ASSERT_TRUE(
        engine::WriteSafetensors(
            (folder_ / "adapter_model.safetensors").string(),
            {{path + "lora_A.weight", engine::DType::kF32, {2, 128}, bytes, zeros.size() * 4},
             {path + "lora_B.weight", engine::DType::kF32, {128, 2}, bytes, zeros.size() * 4}})
            .ok());
  }
  void TearDown() override {
    if (engine_) engine_->Stop();
  }

  // The server, to be held after the service (its destructor shuts it down first); stub_ calls it.
  std::unique_ptr<grpc::Server> Serve(AdapterService& service) {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    EXPECT_NE(server, nullptr);
    stub_ = lorad::v1::AdapterService::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
    return server;
  }
  static lorad::v1::LoadAdapterRequest LoadBot() {
    lorad::v1::LoadAdapterRequest request;
    request.set_name("bot");
    request.set_path("bot");
    return request;
  }

  fs::path dir_, folder_;
  std::unique_ptr<engine::Engine> engine_;
  std::unique_ptr<JobStore> store_;
  std::unique_ptr<lorad::v1::AdapterService::Stub> stub_;
};

// A folder rewritten while LoadAdapter reads it (here between the read and the record, through
// the hook the service holds there) is refused, nothing is recorded or served; loaded again, it is
// recorded with the fingerprint of the files that serve. Before, the fingerprint was taken after
// the read: the record named the new files while the old ones served, and a restart served the
// new ones as that version.
TEST_F(AdapterServiceTest, AFolderRewrittenWhileItIsReadIsRefusedAndNothingIsRecorded) {
  bool rewrite = true;
  std::mutex held;
  AdapterService service(*engine_, (dir_ / "adapters").string(), nullptr, store_.get(), nullptr,
                         [&] {
                           if (rewrite) {  // the operator copies a retrained adapter in
                             std::ofstream(folder_ / "adapter_config.json", std::ios::app) << " ";
                             rewrite = false;
                           }
                           return std::unique_lock<std::mutex>(held);
                         });
  const std::unique_ptr<grpc::Server> server = Serve(service);
  lorad::v1::Adapter reply;
  {
    grpc::ClientContext context;
    const grpc::Status s = stub_->LoadAdapter(&context, LoadBot(), &reply);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::ABORTED) << s.error_message();
    EXPECT_NE(s.error_message().find("changed while it was read"), std::string::npos)
        << s.error_message();
  }
  auto recorded = store_->Adapters();
  ASSERT_TRUE(recorded.ok()) << recorded.status();
  EXPECT_TRUE(recorded->empty());
  EXPECT_TRUE(engine_->adapters().List().empty());

  grpc::ClientContext context;
  const grpc::Status s = stub_->LoadAdapter(&context, LoadBot(), &reply);
  ASSERT_TRUE(s.ok()) << s.error_message();
  recorded = store_->Adapters();
  ASSERT_TRUE(recorded.ok()) << recorded.status();
  ASSERT_EQ(recorded->size(), 1u);
  EXPECT_EQ((*recorded)[0].fingerprint, *engine::PeftFolderFingerprint(folder_.string()));
}

// A load whose client gave up (its deadline passed) while the files were read neither serves nor
// is recorded: the client saw it fail, and sending it again published a second version. The hook
// the service holds before it records waits for the client's failure (and then for the server
// to be told). The next load, on the same one worker, is version 1 and the only record.
TEST_F(AdapterServiceTest, ALoadWhoseClientGaveUpIsNotPublished) {
  BlockingCalls blocking(/*threads=*/1, /*max_queued=*/4);
  std::mutex mu, held;
  std::condition_variable cv;
  bool client_failed = false, first = true;
  AdapterService service(
      *engine_, (dir_ / "adapters").string(), nullptr, store_.get(), &blocking, [&] {
        std::unique_lock<std::mutex> lock(mu);
        if (first) {
          first = false;
          cv.wait_for(lock, std::chrono::seconds(30), [&] { return client_failed; });
          // The server learns of the deadline on its own timer, at about the
          // same moment as the client.
          std::this_thread::sleep_for(std::chrono::seconds(2));
        }
        return std::unique_lock<std::mutex>(held);
      });
  const std::unique_ptr<grpc::Server> server = Serve(service);
  lorad::v1::Adapter reply;
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
    const grpc::Status s = stub_->LoadAdapter(&context, LoadBot(), &reply);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
    std::lock_guard<std::mutex> lock(mu);
    client_failed = true;
  }
  cv.notify_all();
  grpc::ClientContext context;
  const grpc::Status s = stub_->LoadAdapter(&context, LoadBot(), &reply);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(reply.version(), 1) << "the load its client gave up on was published";
  auto recorded = store_->Adapters();
  ASSERT_TRUE(recorded.ok()) << recorded.status();
  EXPECT_EQ(recorded->size(), 1u);
}

// An unload of no name is refused naming the field, also where an adapter is recorded as served
// (the served-records lookup of that name took "" for every name's, and the call went on to
// NOT_FOUND).
TEST_F(AdapterServiceTest, AnUnloadOfNoNameIsRefusedNamingTheField) {
  AdapterService service(*engine_, (dir_ / "adapters").string(), nullptr, store_.get());
  const std::unique_ptr<grpc::Server> server = Serve(service);
  lorad::v1::Adapter loaded;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->LoadAdapter(&context, LoadBot(), &loaded).ok());
  }
  grpc::ClientContext context;
  lorad::v1::UnloadAdapterResponse reply;
  const grpc::Status s = stub_->UnloadAdapter(&context, lorad::v1::UnloadAdapterRequest(), &reply);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_EQ(s.error_message().rfind("name: ", 0), 0u) << s.error_message();
}

// An UnloadAdapter whose client goes away (cancelled, disconnected) while the adapter's requests
// run stops waiting: each such call kept one of the 16 waiting places for an hour (a client with
// no deadline: grpcurl, a plain stub), and the 17th unload of any adapter was refused. Here a
// request's lease holds "bot" while 16 calls without a deadline are cancelled; a 17th is answered.
TEST_F(AdapterServiceTest, AnUnloadWhoseClientLeftStopsWaiting) {
  AdapterService service(*engine_, (dir_ / "adapters").string(), nullptr, store_.get());
  const std::unique_ptr<grpc::Server> server = Serve(service);
  lorad::v1::Adapter loaded;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->LoadAdapter(&context, LoadBot(), &loaded).ok());
  }
  auto lease = engine_->adapters().Acquire("bot");  // a running request's
  ASSERT_TRUE(lease.ok()) << lease.status();
  lorad::v1::UnloadAdapterRequest request;
  request.set_name("bot");
  for (int i = 0; i < 16; ++i) {
    grpc::ClientContext context;  // no deadline
    grpc::Status status;
    std::thread call([&] {
      lorad::v1::UnloadAdapterResponse reply;
      status = stub_->UnloadAdapter(&context, request, &reply);
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    context.TryCancel();
    call.join();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();
  }
  grpc::Status status;
  for (int tries = 0; tries < 50; ++tries) {  // the server notices within 100 ms of each cancel
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
    lorad::v1::UnloadAdapterResponse reply;
    status = stub_->UnloadAdapter(&context, request, &reply);
    if (status.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(status.ok()) << status.error_message();  // still draining: the lease is held
  lease->Release();
}

}  // namespace
}  // namespace lorad::server
