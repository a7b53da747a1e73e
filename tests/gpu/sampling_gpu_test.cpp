// The CUDA sampling kernels against the CPU reference (the specification): the same logits after
// penalties and warpers, and the same token for every seed and step. Needs a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/sampling.h"

namespace lorad::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// A device copy of a host vector, freed at scope exit.
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(const std::vector<T>& host) : n(host.size()) {
    EXPECT_EQ(cudaMalloc(&ptr, std::max<size_t>(1, n) * sizeof(T)), cudaSuccess);
    if (n) {
      EXPECT_EQ(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
    }
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  std::vector<T> Read() const {
    std::vector<T> host(n);
    if (n) {
      EXPECT_EQ(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    }
    return host;
  }
};

struct Batch {
  int64_t batch = 0, vocab = 0;
  std::vector<float> logits;
  std::vector<SamplingRow> rows;
  std::vector<int32_t> tokens;
  std::vector<int64_t> row_begin, generated_begin;
};

// Rows with every mix of parameters: greedy, plain sampling, each filter alone and together,
// penalties on and off; logits optionally rounded to make many ties.
Batch RandomBatch(int64_t batch, int64_t vocab, uint32_t seed, bool ties) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 3.f);
  std::uniform_int_distribution<int32_t> token(
      0, static_cast<int32_t>(std::min<int64_t>(vocab, 3000)) - 1);
  Batch b;
  b.batch = batch;
  b.vocab = vocab;
  b.logits.resize(batch * vocab);
  for (float& x : b.logits) x = ties ? std::round(normal(rng) * 2.f) / 2.f : normal(rng);
  for (int64_t r = 0; r < batch; ++r) {
    SamplingRow row;
    const int kind = static_cast<int>(r % 8);
    row.temperature = kind == 0 ? 0.f : 0.3f + 0.25f * (r % 5);
    if (kind == 2 || kind == 5) row.top_k = 1 + static_cast<int32_t>(rng() % 100);
    if (kind == 3 || kind == 5 || kind == 7) row.top_p = 0.5f + 0.49f * (rng() % 100) / 100.f;
    if (kind == 4 || kind == 5) row.min_p = 0.01f + 0.3f * (rng() % 100) / 100.f;
    if (r % 3 != 0) {
      row.repetition_penalty = 0.8f + 0.1f * (r % 7);
      row.presence_penalty = -0.5f + 0.25f * (r % 5);
      row.frequency_penalty = 0.1f * (r % 4);
    }
    row.seed = 0x9e3779b97f4a7c15ull * (r + 1) + seed;
    row.step = rng() % 1000;
    b.rows.push_back(row);
    b.row_begin.push_back(static_cast<int64_t>(b.tokens.size()));
    const int prompt = static_cast<int>(rng() % 600), generated = static_cast<int>(rng() % 2500);
    for (int i = 0; i < prompt; ++i) b.tokens.push_back(token(rng));
    b.generated_begin.push_back(static_cast<int64_t>(b.tokens.size()));
    for (int i = 0; i < generated; ++i) b.tokens.push_back(token(rng) / 4);  // many repeats
  }
  b.row_begin.push_back(static_cast<int64_t>(b.tokens.size()));
  return b;
}

void ExpectSameLogits(const std::vector<float>& gpu, const std::vector<float>& cpu,
                      const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size());
  int64_t bit_differences = 0;
  for (size_t i = 0; i < gpu.size(); ++i) {
    if (std::isinf(cpu[i])) {
      ASSERT_EQ(gpu[i], cpu[i]) << what << " index " << i;
    } else {
      ASSERT_NEAR(gpu[i], cpu[i], 1e-6f * std::max(1.f, std::fabs(cpu[i])))
          << what << " index " << i;
    }
    bit_differences += std::memcmp(&gpu[i], &cpu[i], sizeof(float)) != 0;
  }
  EXPECT_EQ(bit_differences, 0) << what << ": the kernels are meant to agree bit for bit";
}

class SamplingGpu : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, bool>> {};

TEST_P(SamplingGpu, EveryOpEqualsTheCpuReference) {
  const auto [batch, vocab, ties] = GetParam();
  Batch b = RandomBatch(batch, vocab, static_cast<uint32_t>(batch * 7 + vocab), ties);
  const TokenHistory host_history{b.tokens.data(), b.row_begin.data(), b.generated_begin.data()};

  DeviceBuffer<float> logits(b.logits);
  DeviceBuffer<SamplingRow> rows(b.rows);
  DeviceBuffer<int32_t> tokens(b.tokens);
  DeviceBuffer<int64_t> row_begin(b.row_begin), generated_begin(b.generated_begin);
  DeviceBuffer<int32_t> scratch(std::vector<int32_t>(batch * vocab, 0));
  const TokenHistory device_history{tokens.ptr, row_begin.ptr, generated_begin.ptr};

  std::vector<float> cpu = b.logits;
  sampling_penalties_cpu(cpu.data(), batch, vocab, b.rows.data(), host_history);
  ASSERT_EQ(sampling_penalties_cuda(logits.ptr, batch, vocab, rows.ptr, device_history, scratch.ptr,
                                    nullptr),
            nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  ExpectSameLogits(logits.Read(), cpu, "penalties");
  for (int32_t v : scratch.Read()) ASSERT_EQ(v, 0) << "the scratch must come back zeroed";

  sampling_warp_cpu(cpu.data(), batch, vocab, b.rows.data());
  ASSERT_EQ(sampling_warp_cuda(logits.ptr, batch, vocab, rows.ptr, nullptr), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  ExpectSameLogits(logits.Read(), cpu, "warp");

  // Many draws from the same warped logits: every seed and step gives the CPU's token.
  DeviceBuffer<int32_t> drawn(std::vector<int32_t>(batch, -1));
  for (uint64_t round = 0; round < 40; ++round) {
    for (SamplingRow& row : b.rows) {
      row.step += 1;
      row.seed ^= round * 0x2545f4914f6cdd1dull;
    }
    CUDA_OK(
        cudaMemcpy(rows.ptr, b.rows.data(), batch * sizeof(SamplingRow), cudaMemcpyHostToDevice));
    std::vector<int32_t> want(batch);
    sampling_draw_cpu(cpu.data(), batch, vocab, b.rows.data(), want.data());
    ASSERT_EQ(sampling_draw_cuda(logits.ptr, batch, vocab, rows.ptr, drawn.ptr, nullptr), nullptr);
    CUDA_OK(cudaDeviceSynchronize());
    ASSERT_EQ(drawn.Read(), want) << "round " << round;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SamplingGpu,
    ::testing::Values(std::make_tuple(int64_t{1}, int64_t{128256}, false),   // batch 1: 8 blocks
                      std::make_tuple(int64_t{2}, int64_t{32001}, true),     // split, by floats
                      std::make_tuple(int64_t{16}, int64_t{32000}, false),   // Llama 2 vocabulary
                      std::make_tuple(int64_t{8}, int64_t{128256}, false),   // Llama 3
                      std::make_tuple(int64_t{24}, int64_t{1000}, true),     // ties everywhere
                      std::make_tuple(int64_t{4}, int64_t{5003}, true),      // not by float4
                      std::make_tuple(int64_t{3}, int64_t{511}, false),      // below one chunk
                      std::make_tuple(int64_t{5}, int64_t{1}, false),        // one token
                      std::make_tuple(int64_t{70}, int64_t{4096}, false),    // 2 blocks a row
                      std::make_tuple(int64_t{300}, int64_t{1000}, true)));  // 1 block a row

// The vocabularies of the other models lorad serves (README): Qwen2's 151936 (the largest: 37984
// float4s a row, split over 8 blocks at batch 1) and SmolLM's 49152, at batch 1 (8 blocks a row),
// a few rows, and 32 rows (one block a row on most GPUs).
INSTANTIATE_TEST_SUITE_P(
    OtherModelVocabularies, SamplingGpu,
    ::testing::Values(std::make_tuple(int64_t{1}, int64_t{151936}, false),  // Qwen2
                      std::make_tuple(int64_t{3}, int64_t{151936}, true),
                      std::make_tuple(int64_t{32}, int64_t{151936}, false),
                      std::make_tuple(int64_t{1}, int64_t{49152}, false),  // SmolLM
                      std::make_tuple(int64_t{5}, int64_t{49152}, true),
                      std::make_tuple(int64_t{32}, int64_t{49152}, false),
                      std::make_tuple(int64_t{1}, int64_t{32000}, true)));  // TinyLlama, Mistral

TEST(SamplingGpuEdges, RowsWithoutAFiniteLogitFallBackToTheArgmax) {
  const int64_t vocab = 700;
  std::vector<float> x(2 * vocab, -kInf);
  x[vocab + 5] = 1.f;
  std::vector<SamplingRow> host_rows(2);
  for (auto& r : host_rows) {
    r.temperature = 1.f;
    r.top_p = 0.5f;
    r.seed = 3;
  }
  std::vector<float> cpu = x;
  sampling_warp_cpu(cpu.data(), 2, vocab, host_rows.data());
  std::vector<int32_t> want(2);
  sampling_draw_cpu(cpu.data(), 2, vocab, host_rows.data(), want.data());

  DeviceBuffer<float> logits(x);
  DeviceBuffer<SamplingRow> rows(host_rows);
  DeviceBuffer<int32_t> drawn(std::vector<int32_t>(2, -1));
  ASSERT_EQ(sampling_warp_cuda(logits.ptr, 2, vocab, rows.ptr, nullptr), nullptr);
  ASSERT_EQ(sampling_draw_cuda(logits.ptr, 2, vocab, rows.ptr, drawn.ptr, nullptr), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  ExpectSameLogits(logits.Read(), cpu, "warp");
  EXPECT_EQ(drawn.Read(), want);
  EXPECT_EQ(want, (std::vector<int32_t>{0, 5}));
}

}  // namespace
}  // namespace lorad::kernels
