// AdapterStore: versions and atomic publish, leases that keep a version alive, LRU residency among
// unused adapters, and unload that waits for users and then frees.
#include "engine/lora/adapter_store.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "engine/lora/lora_adapter.h"

namespace lorad::engine {
namespace {

ModelConfig SmallModel() {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = 32;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 8;
  c.max_position_embeddings = 64;
  return c;
}

LoraAdapter Adapter(int r, float fill) {
  LoraConfig config;
  config.r = r;
  config.target_modules = {"q_proj"};
  auto a = LoraAdapter::Init(SmallModel(), config, 1);
  EXPECT_TRUE(a.ok()) << a.status();
  for (auto& [path, pair] : a->layers) pair.b.fill_(fill);
  return *std::move(a);
}

float FirstB(const LoraAdapter& a) { return a.layers.begin()->second.b[0][0].item<float>(); }

std::unique_ptr<AdapterStore> Store(int32_t max_resident = 8) {
  AdapterStoreOptions o;
  o.max_resident = max_resident;
  auto s = AdapterStore::Create(SmallModel(), o);
  EXPECT_TRUE(s.ok()) << s.status();
  return *std::move(s);
}

// The host copy is kept in the compute dtype (bf16 on a GPU): half the host memory of an fp32
// one, and the weights that serve are the adapter's rounded once, as before.
TEST(AdapterStoreTest, TheHostCopyIsInTheComputeDtype) {
  AdapterStoreOptions bf16;
  bf16.dtype = "bfloat16";
  auto half = *AdapterStore::Create(SmallModel(), bf16);
  auto full = Store();
  LoraAdapter adapter = Adapter(4, 0.1f);
  for (auto& [path, pair] : adapter.layers) pair.b.normal_();  // values bf16 must round
  ASSERT_TRUE(half->Publish("x", adapter, "").ok());
  ASSERT_TRUE(full->Publish("x", adapter, "").ok());
  EXPECT_EQ(half->host_bytes() * 2, full->host_bytes());
  auto lease = *half->Acquire("x");
  auto resident = lease.Activate();
  ASSERT_TRUE(resident.ok()) << resident.status();
  for (const auto& [path, pair] : adapter.layers) {
    const LoraPair& served = (*resident)->layers.at(path);
    EXPECT_EQ(served.a.scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(torch::equal(served.a, pair.a.to(torch::kBFloat16))) << path;
    EXPECT_TRUE(torch::equal(served.b, pair.b.to(torch::kBFloat16))) << path;
  }
}

TEST(AdapterStoreTest, PublishIsAtomicAndLeasesKeepTheirVersion) {
  auto store = Store();
  ASSERT_EQ(*store->Publish("chat", Adapter(4, 1.0f), "job:1"), 1);
  auto v1 = store->Acquire("chat");
  ASSERT_TRUE(v1.ok());
  ASSERT_EQ(*store->Publish("chat", Adapter(4, 2.0f), "job:2"), 2);
  auto v2 = store->Acquire("chat");
  ASSERT_TRUE(v2.ok());
  EXPECT_EQ(v1->version(), 1);
  EXPECT_EQ(v2->version(), 2);
  EXPECT_EQ(FirstB(v1->host()), 1.0f);
  EXPECT_EQ(FirstB(v2->host()), 2.0f);
  auto list = store->List();
  ASSERT_EQ(list.size(), 2u);  // v1 lives on while a request holds it
  EXPECT_FALSE(list[0].current);
  EXPECT_TRUE(list[1].current);
  EXPECT_EQ(list[0].requests, 1);
  v1->Release();
  list = store->List();
  ASSERT_EQ(list.size(), 1u);  // freed with its last user
  EXPECT_EQ(list[0].version, 2);
  EXPECT_EQ(list[0].source, "job:2");
}

// An unload bounded by the versions its caller saw (UnloadAdapter records those as unloaded
// first) leaves a version published since then serving: what serves agrees with the record.
TEST(AdapterStoreTest, AnUnloadUpToAVersionLeavesANewerOneServing) {
  auto store = Store();
  ASSERT_EQ(*store->Publish("race", Adapter(4, 1.0f), "folder:a"), 1);
  auto v1 = store->Acquire("race");  // a request on v1
  ASSERT_TRUE(v1.ok());
  ASSERT_EQ(*store->Publish("race", Adapter(4, 2.0f), "folder:b"), 2);  // published meanwhile
  std::thread request([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    v1->Release();
  });
  EXPECT_TRUE(store->Unload("race", std::nullopt, std::chrono::seconds(5), 1).ok());
  request.join();
  // v1 already replaced and freed: the bounded unload has nothing left to do.
  EXPECT_TRUE(store->Unload("race", std::nullopt, std::chrono::seconds(5), 1).ok());
  auto lease = store->Acquire("race");
  ASSERT_TRUE(lease.ok()) << lease.status();
  EXPECT_EQ(lease->version(), 2);
  lease->Release();
  // Nothing seen: nothing unloaded.
  EXPECT_TRUE(absl::IsNotFound(store->Unload("race", std::nullopt, std::chrono::seconds(5), 0)));
  EXPECT_TRUE(store->Contains("race"));
  EXPECT_TRUE(store->Unload("race", std::nullopt, std::chrono::seconds(5), 2).ok());
  EXPECT_FALSE(store->Contains("race"));
}

// The retire listener hears every version that stops being current: replaced by a newer one,
// or unloaded; a first publish retires nothing. It may call back into the store.
// The server records a version before it serves (the hook): one it cannot record never serves,
// the version before it stays current, and its number is used again.
TEST(AdapterStoreTest, AVersionItsHookRefusesIsNotPublished) {
  auto store = Store();
  ASSERT_EQ(*store->Publish("chat", Adapter(4, 1.0f), "v1"), 1);
  int64_t hooked = 0;
  auto refused = store->Publish("chat", Adapter(4, 2.0f), "v2", nullptr, [&](int64_t version) {
    hooked = version;
    EXPECT_TRUE(store->Contains("chat"));
    return absl::ResourceExhaustedError("the disk is full");
  });
  EXPECT_TRUE(absl::IsResourceExhausted(refused.status())) << refused.status();
  EXPECT_EQ(hooked, 2);
  auto lease = store->Acquire("chat");
  ASSERT_TRUE(lease.ok()) << lease.status();
  EXPECT_EQ(lease->version(), 1);
  EXPECT_EQ(FirstB(lease->host()), 1.0f);
  lease->Release();
  // A newer version published while one is recorded retires it at once.
  AdapterInfo info;
  auto overtaken = store->Publish("chat", Adapter(4, 3.0f), "v2", &info, [&](int64_t version) {
    EXPECT_EQ(version, 2);
    EXPECT_EQ(*store->Publish("chat", Adapter(4, 4.0f), "v3"), 3);
    return absl::OkStatus();
  });
  ASSERT_TRUE(overtaken.ok()) << overtaken.status();
  EXPECT_EQ(*overtaken, 2);
  EXPECT_FALSE(info.current);
  auto current = store->Acquire("chat");
  ASSERT_TRUE(current.ok()) << current.status();
  EXPECT_EQ(current->version(), 3);
  EXPECT_EQ(FirstB(current->host()), 4.0f);
  current->Release();
  // ... and also when that newer version was unloaded before the older one's record ended: the
  // older one does not serve in its place (it did: an unload undone, an old adapter serving).
  auto after_unload = store->Publish("chat", Adapter(4, 5.0f), "v4", &info, [&](int64_t version) {
    EXPECT_EQ(version, 4);
    EXPECT_EQ(*store->Publish("chat", Adapter(4, 6.0f), "v5"), 5);
    EXPECT_TRUE(store->Unload("chat", std::nullopt, std::chrono::seconds(1), 5).ok());
    return absl::OkStatus();
  });
  ASSERT_TRUE(after_unload.ok()) << after_unload.status();
  EXPECT_EQ(*after_unload, 4);
  EXPECT_FALSE(info.current);
  EXPECT_FALSE(store->Contains("chat")) << "the unloaded name serves again, an older version";
}

TEST(AdapterStoreTest, RetireListenerHearsReplacedAndUnloadedVersions) {
  auto store = Store();
  int heard = 0;
  store->SetRetireListener([&] {
    ++heard;
    (void)store->List();  // called without the store's lock
  });
  ASSERT_EQ(*store->Publish("chat", Adapter(4, 1.0f), "a"), 1);
  EXPECT_EQ(heard, 0);
  ASSERT_EQ(*store->Publish("chat", Adapter(4, 2.0f), "b"), 2);
  EXPECT_EQ(heard, 1);
  ASSERT_TRUE(store->Unload("chat").ok());
  EXPECT_EQ(heard, 2);
  EXPECT_EQ(store->Unload("chat").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(heard, 2);
}

TEST(AdapterStoreTest, UnknownNamesAndBadAdaptersAreClearErrors) {
  auto store = Store();
  auto missing = store->Acquire("nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("'nope'"), std::string::npos);
  EXPECT_EQ(store->Publish("bad name!", Adapter(2, 1), "x").status().code(),
            absl::StatusCode::kInvalidArgument);
  LoraAdapter wrong = Adapter(2, 1);
  wrong.layers.begin()->second.a = torch::zeros({2, 5});
  auto st = store->Publish("wrong", wrong, "x");
  EXPECT_EQ(st.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.status().message().find("q_proj"), std::string::npos) << st.status();
  EXPECT_EQ(store->Unload("nope").code(), absl::StatusCode::kNotFound);
}

TEST(AdapterStoreTest, ResidencyEvictsTheLeastRecentlyUsedIdleAdapter) {
  auto store = Store(/*max_resident=*/2);
  for (const char* name : {"a", "b", "c"})
    ASSERT_TRUE(store->Publish(name, Adapter(2, 1), "").ok());
  auto a = *store->Acquire("a");
  auto b = *store->Acquire("b");
  auto c = *store->Acquire("c");
  ASSERT_TRUE(a.Activate().ok());
  ASSERT_TRUE(b.Activate().ok());
  // Both slots run requests: c must wait.
  EXPECT_EQ(c.Activate().status().code(), absl::StatusCode::kUnavailable);
  a.Deactivate();
  b.Deactivate();
  ASSERT_TRUE(b.Activate().ok());  // b used more recently than a
  b.Deactivate();
  ASSERT_TRUE(c.Activate().ok());  // evicts a, the least recently used idle one
  EXPECT_EQ(store->resident_count(), 2);
  for (const AdapterInfo& info : store->List()) {
    EXPECT_EQ(info.resident, info.name != "a") << info.name;
  }
}

// The name-gone listener hears a name once nothing of it is left: at once for an unused one;
// for one a request holds, when that request ends, even though its unload gave up waiting long
// before (the server forgets the name's metric series then). Replacing a version leaves the
// name, and so does unloading one version of two.
TEST(AdapterStoreTest, NameGoneListenerHearsTheLastVersionLeave) {
  auto store = Store();
  std::vector<std::string> gone;
  store->SetNameGoneListener([&](const std::string& name) { gone.push_back(name); });
  ASSERT_TRUE(store->Publish("idle", Adapter(4, 1), "").ok());
  ASSERT_TRUE(store->Publish("idle", Adapter(4, 2), "").ok());  // v1 replaced and freed
  EXPECT_TRUE(gone.empty());
  ASSERT_TRUE(store->Unload("idle").ok());
  EXPECT_EQ(gone, (std::vector<std::string>{"idle"}));

  ASSERT_TRUE(store->Publish("held", Adapter(4, 1), "").ok());
  auto lease = *store->Acquire("held");
  ASSERT_TRUE(store->Publish("held", Adapter(4, 2), "").ok());
  ASSERT_TRUE(store->Unload("held", int64_t{2}).ok());  // v1 is still held
  EXPECT_EQ(gone.size(), 1u);
  EXPECT_TRUE(
      absl::IsDeadlineExceeded(store->Unload("held", std::nullopt, std::chrono::milliseconds(10))));
  EXPECT_EQ(gone.size(), 1u);
  lease.Release();  // the last request on it ends
  EXPECT_EQ(gone, (std::vector<std::string>{"idle", "held"}));
}

TEST(AdapterStoreTest, UnloadWaitsForItsUsersThenFrees) {
  auto store = Store();
  ASSERT_TRUE(store->Publish("x", Adapter(4, 1), "").ok());
  auto lease = *store->Acquire("x");
  ASSERT_TRUE(lease.Activate().ok());
  std::atomic<bool> returned{false};
  absl::Status unload;
  std::thread t([&] {
    unload = store->Unload("x");
    returned = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(returned);
  EXPECT_EQ(store->Acquire("x").status().code(), absl::StatusCode::kNotFound);  // retired at once
  EXPECT_GT(store->host_bytes(), 0);
  lease.Release();
  t.join();
  EXPECT_TRUE(unload.ok()) << unload;
  EXPECT_EQ(store->host_bytes(), 0);
  EXPECT_EQ(store->resident_bytes(), 0);
  EXPECT_TRUE(store->List().empty());
  // A timeout says the adapter is still in use.
  ASSERT_TRUE(store->Publish("y", Adapter(2, 1), "").ok());
  auto held = *store->Acquire("y");
  auto late = store->Unload("y", std::nullopt, std::chrono::milliseconds(10));
  EXPECT_EQ(late.code(), absl::StatusCode::kDeadlineExceeded);
  held.Release();
  EXPECT_TRUE(store->List().empty());
}

}  // namespace
}  // namespace lorad::engine
