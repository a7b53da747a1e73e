// Multi-adapter LoRA at Llama-3-8B's q_proj shape (4096 -> 4096), bf16, rank 16: BGMV for decode
// batches with 1 and 4 different adapters mixed, and SGMV for a 2048-row prefill in 4 segments;
// then q, k and v (4096 -> 4096, 1024, 1024) as three launches and as one group launch, and the
// MLP's gate, up (one group) and down at batch 32.
// The LoRA delta should cost little next to the base GEMV; 4 adapters should cost about as much
// as 1. Timing: bench_timer.h (graphs, events, median).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <functional>
#include <vector>

#include "bench/bench_timer.h"
#include "kernels/lora_bgmv.h"

using namespace lorad::bench;
using namespace lorad::kernels;

namespace {

__global__ void FillKernel(__nv_bfloat16* p, int64_t n, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = __float2bfloat16_rn(((h & 0xffff) / 65536.f - 0.5f) * scale);
  }
}

__nv_bfloat16* Alloc(int64_t n, float scale) {
  __nv_bfloat16* p;
  Check(cudaMalloc(&p, n * 2), "malloc");
  FillKernel<<<256, 256>>>(p, n, scale);
  Check(cudaGetLastError(), "fill");
  return p;
}

// Row i of a batch on adapter i % adapters, in index_d.
void UploadIndex(int32_t* index_d, int64_t batch, int adapters) {
  std::vector<int32_t> index(batch);
  for (int64_t i = 0; i < batch; ++i) index[i] = static_cast<int32_t>(i % adapters);
  Check(cudaMemcpy(index_d, index.data(), batch * 4, cudaMemcpyHostToDevice), "copy");
}

// The median of 41 timings of 50 back-to-back launches (bench_timer.h), us per launch.
double Micros(cudaStream_t stream, const std::function<void()>& launch) {
  bool graphed = false;
  return MedianMicros(
      stream, [&](int) { launch(); }, 50, 41, &graphed);
}

void Fail(const char* err) {
  if (err) {
    std::fprintf(stderr, "lora: %s\n", err);
    std::exit(1);
  }
}

}  // namespace

int main() {
  constexpr int64_t kIn = 4096, kOut = 4096, kSlots = 4;
  constexpr int32_t kRank = 16;
  cudaStream_t stream;
  Check(cudaStreamCreate(&stream), "stream");
  std::vector<const void*> a(kSlots), b(kSlots);
  for (int s = 0; s < kSlots; ++s) {
    a[s] = Alloc(kRank * kIn, 0.03f);
    b[s] = Alloc(kOut * kRank, 0.03f);
  }
  const std::vector<int32_t> ranks(kSlots, kRank);
  const std::vector<float> scales(kSlots, 2.f);
  const void** a_d;
  const void** b_d;
  int32_t* rank_d;
  float* scale_d;
  Check(cudaMalloc(&a_d, kSlots * sizeof(void*)), "malloc");
  Check(cudaMalloc(&b_d, kSlots * sizeof(void*)), "malloc");
  Check(cudaMalloc(&rank_d, kSlots * 4), "malloc");
  Check(cudaMalloc(&scale_d, kSlots * 4), "malloc");
  Check(cudaMemcpy(a_d, a.data(), kSlots * sizeof(void*), cudaMemcpyHostToDevice), "copy");
  Check(cudaMemcpy(b_d, b.data(), kSlots * sizeof(void*), cudaMemcpyHostToDevice), "copy");
  Check(cudaMemcpy(rank_d, ranks.data(), kSlots * 4, cudaMemcpyHostToDevice), "copy");
  Check(cudaMemcpy(scale_d, scales.data(), kSlots * 4, cudaMemcpyHostToDevice), "copy");
  const LoraAdapterTable table{a_d, b_d, rank_d, scale_d, kSlots, kRank};

  const int64_t kMaxRows = 2048;
  __nv_bfloat16* x = Alloc(kMaxRows * kIn, 1.f);
  __nv_bfloat16* y = Alloc(kMaxRows * kOut, 1.f);
  void* scratch;
  Check(cudaMalloc(&scratch, lora_scratch_bytes(kMaxRows, kIn, 3 * kRank)), "malloc");
  int32_t* index_d;
  Check(cudaMalloc(&index_d, kMaxRows * 4), "malloc");

  std::printf("LoRA delta, 4096 -> 4096, rank %d, bf16\n%-34s %10s\n", kRank, "case", "us");
  for (const int64_t batch : {1, 32}) {
    for (const int adapters : {1, 4}) {
      if (batch == 1 && adapters == 4) continue;
      UploadIndex(index_d, batch, adapters);
      const double us = Micros(stream, [&] {
        Fail(lora_bgmv_cuda(x, FloatKind::kBF16, batch, kIn, index_d, table, kOut, y, scratch,
                            stream));
      });
      char name[64];
      std::snprintf(name, sizeof(name), "bgmv batch %lld, %d adapter(s)",
                    static_cast<long long>(batch), adapters);
      std::printf("%-34s %10.2f\n", name, us);
    }
  }
  const std::vector<int64_t> starts = {0, 512, 1024, 1536, 2048};
  const std::vector<int32_t> seg = {0, 1, 2, 3};
  int64_t* starts_d;
  int32_t* seg_d;
  Check(cudaMalloc(&starts_d, starts.size() * 8), "malloc");
  Check(cudaMalloc(&seg_d, seg.size() * 4), "malloc");
  Check(cudaMemcpy(starts_d, starts.data(), starts.size() * 8, cudaMemcpyHostToDevice), "copy");
  Check(cudaMemcpy(seg_d, seg.data(), seg.size() * 4, cudaMemcpyHostToDevice), "copy");
  bool graphed = false;
  const double us = MedianMicros(
      stream,
      [&](int) {
        Fail(lora_sgmv_cuda(x, FloatKind::kBF16, kMaxRows, kIn, starts_d, seg_d, 4, table, kOut, y,
                            scratch, stream));
      },
      10, 21, &graphed);
  std::printf("%-34s %10.2f\n", "sgmv 2048 rows, 4 segments", us);

  // q, k and v of one decoder layer (k and v use the first 1024 rows of the same B).
  constexpr int64_t kKv = 1024;
  __nv_bfloat16* y_k = Alloc(32 * kKv, 1.f);
  __nv_bfloat16* y_v = Alloc(32 * kKv, 1.f);
  const LoraTarget qkv[3] = {{table, kOut, y}, {table, kKv, y_k}, {table, kKv, y_v}};
  for (const int64_t batch : {1, 32}) {
    UploadIndex(index_d, batch, 4);
    const double three = Micros(stream, [&] {
      for (const LoraTarget& t : qkv) {
        Fail(lora_bgmv_cuda(x, FloatKind::kBF16, batch, kIn, index_d, t.table, t.out_features, t.y,
                            scratch, stream));
      }
    });
    const double group = Micros(stream, [&] {
      Fail(lora_bgmv_group_cuda(x, FloatKind::kBF16, batch, kIn, index_d, qkv, 3, scratch, stream));
    });
    char name[64];
    std::snprintf(name, sizeof(name), "q,k,v batch %lld: 3 launches",
                  static_cast<long long>(batch));
    std::printf("%-34s %10.2f\n", name, three);
    std::snprintf(name, sizeof(name), "q,k,v batch %lld: one group", static_cast<long long>(batch));
    std::printf("%-34s %10.2f   (%.2fx)\n", name, group, three / group);
  }

  // The MLP's two launch pairs of a decoder layer at batch 32 on 4 adapters: gate and up
  // (4096 -> 14336, one group) and down (14336 -> 4096: 28 chunks of partial sums per t).
  constexpr int64_t kInter = 14336, kBatch = 32;
  std::vector<const void*> a_mlp(kSlots), b_mlp(kSlots), a_down(kSlots), b_down(kSlots);
  for (int s = 0; s < kSlots; ++s) {
    a_mlp[s] = a[s];  // [16, 4096]
    b_mlp[s] = Alloc(kInter * kRank, 0.03f);
    a_down[s] = Alloc(kRank * kInter, 0.03f);
    b_down[s] = b[s];  // [4096, 16]
  }
  const void** mlp_d;
  Check(cudaMalloc(&mlp_d, 4 * kSlots * sizeof(void*)), "malloc");
  for (const auto& [k, v] : {std::pair{0, &a_mlp}, {1, &b_mlp}, {2, &a_down}, {3, &b_down}}) {
    Check(cudaMemcpy(mlp_d + k * kSlots, v->data(), kSlots * sizeof(void*), cudaMemcpyHostToDevice),
          "copy");
  }
  const LoraAdapterTable gate_up{mlp_d, mlp_d + kSlots, rank_d, scale_d, kSlots, kRank};
  const LoraAdapterTable down{
      mlp_d + 2 * kSlots, mlp_d + 3 * kSlots, rank_d, scale_d, kSlots, kRank};
  __nv_bfloat16* y_gate = Alloc(kBatch * kInter, 1.f);
  __nv_bfloat16* y_up = Alloc(kBatch * kInter, 1.f);
  __nv_bfloat16* h = Alloc(kBatch * kInter, 1.f);
  const LoraTarget gu[2] = {{gate_up, kInter, y_gate}, {gate_up, kInter, y_up}};
  UploadIndex(index_d, kBatch, 4);
  const double gate_up_us = Micros(stream, [&] {
    Fail(lora_bgmv_group_cuda(x, FloatKind::kBF16, kBatch, kIn, index_d, gu, 2, scratch, stream));
  });
  std::printf("%-34s %10.2f\n", "gate,up batch 32, 4 adapters", gate_up_us);
  const double down_us = Micros(stream, [&] {
    Fail(lora_bgmv_cuda(h, FloatKind::kBF16, kBatch, kInter, index_d, down, kOut, y, scratch,
                        stream));
  });
  std::printf("%-34s %10.2f\n", "down batch 32, 4 adapters", down_us);
  return 0;
}
