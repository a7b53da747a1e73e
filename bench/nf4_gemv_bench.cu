// Decode GEMV at Llama-3-8B shapes, bf16 activations. First table (batch 1): lorad's NF4 GEMV
// (packed weights + double-quantized absmax read directly) against the bf16 cuBLAS GEMV
// (cublasGemmEx) and against dequantize-to-bf16-then-cuBLAS, all measured in this run, next to the
// device-to-device copy bandwidth measured in this run too. 'nf4' is nf4_gemv_cuda with plain
// launches; 'pdl' is nf4_gemv_cuda_overlapped (programmatic dependent launch: each launch in the
// back-to-back chain fetches its weights while its predecessor finishes, as a chain of decode
// kernels would). Second table: the tensor-core kernel (kernels/nf4_mma.h) at batch 1 (the
// planner's split and each fixed split), batch 8 and batch 32, next to cuBLAS on the bf16 weight
// and dequantize + cuBLAS at batch 32 (the engine's batch-32 path before this kernel), and the
// whole decoder layer's bandwidth (its seven products' bytes over their summed times). Last, the
// layer's products launched as the engine's decode step launches them (four launches, chained).
//
// Timing: bench_timer.h (warm-up, CUDA graph of back-to-back runs, CUDA events, median). Every
// method rotates among enough copies of its weights to exceed the L2 cache several times, so the
// numbers are HBM numbers. GB/s counts the bytes each method must read and write once.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/bench_timer.h"
#include "bench/nf4_mma_timeline_report.h"
#include "kernels/dynamic_quant8.h"
#include "kernels/nf4.h"
#include "kernels/nf4_gemv.h"
#include "kernels/nf4_mma.h"

namespace lorad::bench {
namespace {

using kernels::FloatKind;

void CheckBlas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "cuBLAS error %d: %s\n", static_cast<int>(s), what);
    std::exit(1);
  }
}

void CheckKernel(const char* err, const char* what) {
  if (err != nullptr) {
    std::fprintf(stderr, "%s: %s\n", what, err);
    std::exit(1);
  }
}

// Roughly normal values (sum of 4 hashed uniforms), std `scale`: never zeros (METHOD.md).
__global__ void FillKernel(__nv_bfloat16* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    for (int k = 0; k < 4; ++k) {
      h ^= h >> 15;
      h *= 0x2c1b3c6du;
      h ^= h >> 12;
      h *= 0x297a2d39u;
      h ^= h >> 15;
      sum += (h & 0xffffff) / 16777216.f - 0.5f;
    }
    p[i] = __float2bfloat16_rn(sum * 1.7320508f * scale);
  }
}

void Fill(__nv_bfloat16* p, int64_t n, uint32_t seed, float scale) {
  FillKernel<<<1024, 256>>>(p, n, seed, scale);
  Check(cudaGetLastError(), "fill");
}

// A plain 16-byte-per-thread copy kernel: the ceiling a memory-bound kernel can reach here
// (cudaMemcpyAsync inside a graph became a copy-engine node and moved only ~2.7 TB/s).
__global__ void CopyKernel(const uint4* __restrict__ src, uint4* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = src[i];
  }
}

double CopyBandwidthGBs(cudaStream_t stream, int sms) {
  const size_t bytes = size_t{1} << 30;
  void *a, *b;
  Check(cudaMalloc(&a, bytes), "malloc");
  Check(cudaMalloc(&b, bytes), "malloc");
  Check(cudaMemset(a, 1, bytes), "memset");
  bool graphed = false;
  const double us = MedianMicros(
      stream,
      [&](int) {
        CopyKernel<<<sms * 8, 512, 0, stream>>>(static_cast<const uint4*>(a),
                                                static_cast<uint4*>(b), bytes / 16);
      },
      5, 21, &graphed);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / us / 1e3;  // read + write
}

struct Row {
  const char* name;
  int64_t out, in;
};

// The tensor-core kernel's figures for one shape (us unless named otherwise).
struct MmaRow {
  const char* name;
  int64_t out, in;
  double bytes;  // packed weights + absmax + x + y at batch 1
  double t1, t1_pdl, t_blocks[5], t32_blocks[5], t8, t32, t32_blas, t32_dq, rel_diff;
  bool graphed;
};

void PrintMmaTable(const std::vector<MmaRow>& rows, double copy_gbs) {
  std::printf("\ntensor-core kernel (nf4_mma_cuda), bf16:\n");
  std::printf(
      "%-14s %12s | %8s %7s %6s | %8s %6s | %7s %7s %7s %7s %7s | %8s | %8s %9s %9s | %8s %8s | "
      "%s\n",
      "layer", "out x in", "b=1 us", "GB/s", "%copy", "pdl us", "%copy", "grid=16", "32", "64",
      "112", "128", "b=8 us", "b=32 us", "bf16 b=32", "dq+ b=32", "vs bf16", "vs dq+",
      "max rel diff b=32");
  for (const MmaRow& m : rows) {
    const double gbs = m.bytes / m.t1 / 1e3;
    std::printf(
        "%-14s %5lld x %5lld | %8.2f %7.0f %5.0f%% | %8.2f %5.0f%% | %7.2f %7.2f %7.2f %7.2f %7.2f "
        "| "
        "%8.2f | %8.2f %9.2f %9.2f | %7.2fx %7.2fx | %.2e%s\n",
        m.name, static_cast<long long>(m.out), static_cast<long long>(m.in), m.t1, gbs,
        100.0 * gbs / copy_gbs, m.t1_pdl, 100.0 * m.bytes / m.t1_pdl / 1e3 / copy_gbs,
        m.t_blocks[0], m.t_blocks[1], m.t_blocks[2], m.t_blocks[3], m.t_blocks[4], m.t8, m.t32,
        m.t32_blas, m.t32_dq, m.t32_blas / m.t32, m.t32_dq / m.t32, m.rel_diff,
        m.graphed ? "" : "  (some not graphed)");
  }
  // A Llama-3-8B decoder layer: q, o (4096 x 4096), k, v (1024 x 4096), gate, up, down.
  double bytes = 0, t1 = 0, t1_pdl = 0, t32 = 0, t32_dq = 0;
  for (const MmaRow& m : rows) {
    const int count = m.out == 14336 || (m.out == 4096 && m.in == 4096) || m.out == 1024 ? 2 : 1;
    bytes += count * m.bytes;
    t1 += count * m.t1;
    t1_pdl += count * m.t1_pdl;
    t32 += count * m.t32;
    t32_dq += count * m.t32_dq;
  }
  std::printf(
      "decoder layer (q,k,v,o,gate,up,down): batch 1 %.1f us = %.0f GB/s = %.0f%% of copy "
      "(pdl %.1f us = %.0f%%); batch 32 %.1f us vs dequantize + cuBLAS %.1f us (%.2fx)\n",
      t1, bytes / t1 / 1e3, 100.0 * bytes / t1 / 1e3 / copy_gbs, t1_pdl,
      100.0 * bytes / t1_pdl / 1e3 / copy_gbs, t32, t32_dq, t32_dq / t32);
  std::printf(
      "'%%copy' = achieved GB/s over the copy bandwidth above (issue 3's target: >= 70%%).\n"
      "grid=N: batch 1 on N blocks (fewer where the weight has fewer row tiles) instead of the\n"
      "planner's one per SM (or per tile).\n");
  std::printf("\nbatch 32 on N blocks (us; the planner's grid is b=32 above):\n");
  std::printf("%-14s %12s | %7s %7s %7s %7s %7s\n", "layer", "out x in", "grid=16", "32", "64",
              "112", "128");
  for (const MmaRow& m : rows) {
    std::printf("%-14s %5lld x %5lld | %7.2f %7.2f %7.2f %7.2f %7.2f\n", m.name,
                static_cast<long long>(m.out), static_cast<long long>(m.in), m.t32_blocks[0],
                m.t32_blocks[1], m.t32_blocks[2], m.t32_blocks[3], m.t32_blocks[4]);
  }
}

// One NF4 weight as the engine stores it (packed nibbles, double-quantized absmax), `copies`
// copies of it so that a chain rotating among them reads HBM, not L2.
struct Nf4Copies {
  int64_t out = 0, in = 0;
  double bytes = 0;  // one copy's packed + qabsmax + absmax2
  std::vector<uint8_t*> packed, qabsmax;
  std::vector<float*> absmax2;
  float offset = 0.f;
};

Nf4Copies MakeNf4Copies(int64_t out, int64_t in, int copies, uint32_t seed, const float* code,
                        cudaStream_t stream) {
  Nf4Copies w;
  w.out = out;
  w.in = in;
  const int64_t n = out * in, blocks = kernels::Nf4Blocks(n), blocks2 = (blocks + 255) / 256;
  w.bytes = n / 2.0 + blocks + blocks2 * 4.0;
  __nv_bfloat16* dense;
  float* absmax;
  Check(cudaMalloc(&dense, n * 2), "malloc");
  Check(cudaMalloc(&absmax, blocks * 4), "malloc");
  Fill(dense, n, seed, 0.02f);
  for (int c = 0; c < copies; ++c) {
    uint8_t *packed, *qabsmax;
    float* absmax2;
    Check(cudaMalloc(&packed, n / 2), "malloc");
    Check(cudaMalloc(&qabsmax, blocks), "malloc");
    Check(cudaMalloc(&absmax2, blocks2 * 4), "malloc");
    CheckKernel(kernels::nf4_quantize_cuda(dense, FloatKind::kBF16, n, packed, absmax, stream),
                "quantize");
    if (c == 0) {
      std::vector<float> host(blocks);
      Check(cudaMemcpy(host.data(), absmax, blocks * 4, cudaMemcpyDeviceToHost), "absmax");
      double sum = 0;
      for (float a : host) sum += a;
      w.offset = static_cast<float>(sum / blocks);
    }
    CheckKernel(kernels::dynamic_quant8_quantize_cuda(absmax, blocks, w.offset, 256, code, qabsmax,
                                                      absmax2, stream),
                "double quant");
    w.packed.push_back(packed);
    w.qabsmax.push_back(qabsmax);
    w.absmax2.push_back(absmax2);
  }
  Check(cudaStreamSynchronize(stream), "quantize");
  cudaFree(dense);
  cudaFree(absmax);
  return w;
}

void FreeNf4Copies(Nf4Copies& w) {
  for (size_t c = 0; c < w.packed.size(); ++c) {
    cudaFree(w.packed[c]);
    cudaFree(w.qabsmax[c]);
    cudaFree(w.absmax2[c]);
  }
}

kernels::Nf4MmaTarget TargetOf(const Nf4Copies& w, int c, const float* code, void* y) {
  kernels::Nf4MmaTarget t;
  const size_t k = static_cast<size_t>(c) % w.packed.size();
  t.packed = w.packed[k];
  t.absmax = kernels::Nf4Absmax{w.qabsmax[k], w.absmax2[k], code, w.offset};
  t.out_features = w.out;
  t.y = y;
  return t;
}

// A Llama-3-8B decoder layer's products at batch 1 launched as the engine's decode step launches
// them (engine/model/nf4_tensor.cpp): q, k and v in one grouped launch, o alone, gate and up in one
// launch ending in silu(gate) * up, down alone; each chain of four from the next copy of the
// layer's weights. The table above times each weight alone, so its "decoder layer" line sums
// seven launches where the engine makes four. Here the attention, norms and residual adds that
// run between the products in the engine are left out: these are the products' own figures.
void PrintEngineLayer(cudaStream_t stream, double copy_gbs) {
  float* code;
  Check(cudaMalloc(&code, 256 * 4), "malloc");
  Check(cudaMemcpy(code, kernels::kDynamicMapSigned, 1024, cudaMemcpyHostToDevice), "code");
  const int64_t hidden = 4096, kv = 1024, inter = 14336;
  const double layer_bytes =
      (2.0 * hidden * hidden + 2.0 * kv * hidden + 3.0 * inter * hidden) * (0.5 + 1.0 / 64);
  const int copies = static_cast<int>(std::max(2.0, (size_t{256} << 20) / layer_bytes + 1));
  Nf4Copies q = MakeNf4Copies(hidden, hidden, copies, 11u, code, stream);
  Nf4Copies k = MakeNf4Copies(kv, hidden, copies, 12u, code, stream);
  Nf4Copies v = MakeNf4Copies(kv, hidden, copies, 13u, code, stream);
  Nf4Copies o = MakeNf4Copies(hidden, hidden, copies, 14u, code, stream);
  Nf4Copies gate = MakeNf4Copies(inter, hidden, copies, 15u, code, stream);
  Nf4Copies up = MakeNf4Copies(inter, hidden, copies, 16u, code, stream);
  Nf4Copies down = MakeNf4Copies(hidden, inter, copies, 17u, code, stream);
  // Activations: x (hidden), q/k/v outputs, attention output stand-in, o output, MLP activation.
  __nv_bfloat16 *x, *yq, *yk, *yv, *yo, *act, *ydown;
  __nv_bfloat16** const buffers[] = {&x, &yq, &yk, &yv, &yo, &act, &ydown};
  const int64_t sizes[] = {hidden, hidden, kv, kv, hidden, inter, hidden};
  for (int i = 0; i < 7; ++i) {
    Check(cudaMalloc(buffers[i], sizes[i] * 2), "malloc");
    Fill(*buffers[i], sizes[i], 99u + i, 1.f);
  }
  Check(cudaDeviceSynchronize(), "setup");
  auto chain = [&](int c, bool overlapped) {
    const kernels::Nf4MmaTarget qkv[3] = {TargetOf(q, c, code, yq), TargetOf(k, c, code, yk),
                                          TargetOf(v, c, code, yv)};
    CheckKernel(
        kernels::nf4_mma_group_cuda(x, FloatKind::kBF16, 1, qkv, 3, hidden, stream, overlapped),
        "qkv");
    // o reads q's output as its stand-in for the attention output.
    const kernels::Nf4MmaTarget ot = TargetOf(o, c, code, yo);
    CheckKernel(
        kernels::nf4_mma_group_cuda(yq, FloatKind::kBF16, 1, &ot, 1, hidden, stream, overlapped),
        "o");
    CheckKernel(kernels::nf4_mma_silu_mul_cuda(
                    yo, FloatKind::kBF16, 1, TargetOf(gate, c, code, nullptr),
                    TargetOf(up, c, code, nullptr), hidden, act, stream, overlapped),
                "gate/up");
    const kernels::Nf4MmaTarget dt = TargetOf(down, c, code, ydown);
    CheckKernel(
        kernels::nf4_mma_group_cuda(act, FloatKind::kBF16, 1, &dt, 1, inter, stream, overlapped),
        "down");
  };
  const double bytes =
      q.bytes + k.bytes + v.bytes + o.bytes + gate.bytes + up.bytes + down.bytes +
      2.0 * (hidden + hidden + kv + kv + hidden + hidden + hidden + inter + inter + hidden);
  const auto percent = [&](double us) { return 100.0 * bytes / us / 1e3 / copy_gbs; };
  std::printf(
      "\ndecoder layer as the engine launches it at batch 1 (q+k+v grouped, o, gate+up ending in "
      "silu * up, down: 4 launches), %d rotating copies of the layer (%.1f MB each); five "
      "measurements of each (each the median of 41), %% of the copy bandwidth above:\n",
      copies, bytes / 1e6);
  for (const bool overlapped : {false, true}) {
    std::vector<double> runs;
    bool graphed = true;
    for (int i = 0; i < 5; ++i) {
      bool g = false;
      runs.push_back(MedianMicros(
          stream, [&](int c) { chain(c, overlapped); }, 30, 41, &g));
      graphed = graphed && g;
    }
    std::string each;
    for (double us : runs)
      each += (each.empty() ? "" : ", ") + std::to_string(percent(us)).substr(0, 4) + "%";
    std::sort(runs.begin(), runs.end());
    std::printf("  %-36s median %.1f us = %.0f GB/s = %.1f%% of copy (each: %s)%s\n",
                overlapped ? "programmatic launch (the engine's):" : "plain launches:", runs[2],
                bytes / runs[2] / 1e3, percent(runs[2]), each.c_str(),
                graphed ? "" : "  (not graphed)");
  }
  for (Nf4Copies* w : {&q, &k, &v, &o, &gate, &up, &down}) FreeNf4Copies(*w);
  for (void* p : {static_cast<void*>(x), static_cast<void*>(yq), static_cast<void*>(yk),
                  static_cast<void*>(yv), static_cast<void*>(yo), static_cast<void*>(act),
                  static_cast<void*>(ydown), static_cast<void*>(code)}) {
    cudaFree(p);
  }
}

}  // namespace
}  // namespace lorad::bench

int main() {
  using namespace lorad::bench;
  using namespace lorad::kernels;
  cudaDeviceProp prop;
  Check(cudaGetDeviceProperties(&prop, 0), "properties");
  std::printf("device: %s, %d SMs, L2 %d MiB, sm_%d%d\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, prop.major, prop.minor);
  cudaStream_t stream;
  Check(cudaStreamCreate(&stream), "stream");
  cublasHandle_t blas;
  CheckBlas(cublasCreate(&blas), "create");
  CheckBlas(cublasSetStream(blas, stream), "stream");
  const double copy_gbs = CopyBandwidthGBs(stream, prop.multiProcessorCount);
  std::printf("device-to-device copy bandwidth (read + write): %.0f GB/s\n\n", copy_gbs);

  const Row rows[] = {{"q_proj/o_proj", 4096, 4096},
                      {"down_proj", 4096, 14336},
                      {"gate/up_proj", 14336, 4096},
                      {"k/v_proj", 1024, 4096}};
  std::printf(
      "%-14s %12s | %9s %7s %6s | %9s %7s %6s | %9s %7s | %11s | %8s %8s | %7s %7s %7s | %s\n",
      "layer", "out x in", "nf4 us", "GB/s", "%copy", "pdl us", "GB/s", "%copy", "bf16 us", "GB/s",
      "dq+bf16 us", "vs bf16", "vs dq+", "r/w=1", "r/w=2", "r/w=4", "max rel diff");
  const size_t kRotateBytes = size_t{256} << 20;  // > 4x the L2 of an H100/H200
  std::vector<MmaRow> mma_rows;
#if defined(LORAD_NF4_MMA_TIMELINE)
  std::vector<std::string> timelines;
#endif
  // NF4_BENCH_LAYER=<name>: only that layer (e.g. under a profiler).
  const char* only = std::getenv("NF4_BENCH_LAYER");
  for (const Row& r : rows) {
    if (only != nullptr && std::string(only) != r.name) continue;
    const int64_t n = r.out * r.in, blocks = Nf4Blocks(n), blocks2 = (blocks + 255) / 256;
    // One bf16 weight, its NF4 form with double-quantized absmax (as the engine stores it).
    __nv_bfloat16* w;
    Check(cudaMalloc(&w, n * 2), "malloc");
    Fill(w, n, 1234u + static_cast<uint32_t>(n), 0.02f);
    uint8_t* packed;
    float *absmax, *absmax2, *absmax_dq, *code;
    uint8_t* qabsmax;
    Check(cudaMalloc(&packed, n / 2), "malloc");
    Check(cudaMalloc(&absmax, blocks * 4), "malloc");
    Check(cudaMalloc(&absmax_dq, blocks * 4), "malloc");
    Check(cudaMalloc(&qabsmax, blocks), "malloc");
    Check(cudaMalloc(&absmax2, blocks2 * 4), "malloc");
    Check(cudaMalloc(&code, 256 * 4), "malloc");
    Check(cudaMemcpy(code, kDynamicMapSigned, 1024, cudaMemcpyHostToDevice), "code");
    CheckKernel(nf4_quantize_cuda(w, FloatKind::kBF16, n, packed, absmax, stream), "quantize");
    std::vector<float> absmax_host(blocks);
    Check(cudaMemcpy(absmax_host.data(), absmax, blocks * 4, cudaMemcpyDeviceToHost), "absmax");
    double sum = 0;
    for (float a : absmax_host) sum += a;
    const float offset = static_cast<float>(sum / blocks);
    CheckKernel(
        dynamic_quant8_quantize_cuda(absmax, blocks, offset, 256, code, qabsmax, absmax2, stream),
        "double quant");

    // Rotating copies: NF4 (packed + qabsmax + absmax2) and bf16.
    const size_t nf4_bytes = n / 2 + blocks + blocks2 * 4;
    const int nf4_copies = static_cast<int>(std::max<size_t>(2, kRotateBytes / nf4_bytes + 1));
    const int bf16_copies = static_cast<int>(std::max<size_t>(2, kRotateBytes / (n * 2) + 1));
    std::vector<uint8_t*> packed_c(nf4_copies), qabsmax_c(nf4_copies);
    std::vector<float*> absmax2_c(nf4_copies);
    for (int c = 0; c < nf4_copies; ++c) {
      Check(cudaMalloc(&packed_c[c], n / 2), "malloc");
      Check(cudaMalloc(&qabsmax_c[c], blocks), "malloc");
      Check(cudaMalloc(&absmax2_c[c], blocks2 * 4), "malloc");
      Check(cudaMemcpy(packed_c[c], packed, n / 2, cudaMemcpyDeviceToDevice), "copy");
      Check(cudaMemcpy(qabsmax_c[c], qabsmax, blocks, cudaMemcpyDeviceToDevice), "copy");
      Check(cudaMemcpy(absmax2_c[c], absmax2, blocks2 * 4, cudaMemcpyDeviceToDevice), "copy");
    }
    std::vector<__nv_bfloat16*> w_c(bf16_copies);
    for (int c = 0; c < bf16_copies; ++c) {
      Check(cudaMalloc(&w_c[c], n * 2), "malloc");
      // The baseline multiplies the dequantized NF4 weight: the same numbers as the NF4 GEMV.
      CheckKernel(dynamic_quant8_dequantize_cuda(qabsmax, absmax2, code, blocks, 256, offset,
                                                 absmax_dq, stream),
                  "dq absmax");
      CheckKernel(nf4_dequantize_cuda(packed, absmax_dq, n, w_c[c], FloatKind::kBF16, stream),
                  "dequantize");
    }
    __nv_bfloat16 *x, *y_nf4, *y_blas, *w_tmp;
    Check(cudaMalloc(&x, kNf4MmaMaxRows * r.in * 2), "malloc");
    Check(cudaMalloc(&y_nf4, kNf4MmaMaxRows * r.out * 2), "malloc");
    Check(cudaMalloc(&y_blas, kNf4MmaMaxRows * r.out * 2), "malloc");
    Check(cudaMalloc(&w_tmp, n * 2), "malloc");
    Fill(x, kNf4MmaMaxRows * r.in, 77u, 1.f);
    Check(cudaDeviceSynchronize(), "setup");

    const float alpha = 1.f, beta = 0.f;
    // y = W x with W [out, in] row-major = column-major [in, out]: y = op(A)^T x, lda = in.
    auto blas_gemv = [&](const __nv_bfloat16* weight, __nv_bfloat16* y) {
      CheckBlas(
          cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(r.out), 1,
                       static_cast<int>(r.in), &alpha, weight, CUDA_R_16BF, static_cast<int>(r.in),
                       x, CUDA_R_16BF, static_cast<int>(r.in), &beta, y, CUDA_R_16BF,
                       static_cast<int>(r.out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "gemm");
    };
    // The same with `cols` rows of x (y = x W^T as column-major [out, cols]).
    auto blas_gemm = [&](const __nv_bfloat16* weight, __nv_bfloat16* y, int cols) {
      CheckBlas(
          cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(r.out), cols,
                       static_cast<int>(r.in), &alpha, weight, CUDA_R_16BF, static_cast<int>(r.in),
                       x, CUDA_R_16BF, static_cast<int>(r.in), &beta, y, CUDA_R_16BF,
                       static_cast<int>(r.out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "gemm");
    };
    auto nf4_mma = [&](int c, int rows, int blocks, bool overlapped) {
      const Nf4Absmax am{qabsmax_c[c % nf4_copies], absmax2_c[c % nf4_copies], code, offset};
      CheckKernel(blocks == 0 ? nf4_mma_cuda(x, FloatKind::kBF16, rows, packed_c[c % nf4_copies],
                                             am, r.out, r.in, y_nf4, stream, overlapped)
                              : nf4_mma_cuda_blocks(blocks, x, FloatKind::kBF16, rows,
                                                    packed_c[c % nf4_copies], am, r.out, r.in,
                                                    y_nf4, stream),
                  "nf4 mma");
    };
    auto nf4_variant = [&](int rows_per_warp, int c) {
      const Nf4Absmax am{qabsmax_c[c % nf4_copies], absmax2_c[c % nf4_copies], code, offset};
      CheckKernel(
          nf4_gemv_cuda_rows_per_warp(rows_per_warp, x, FloatKind::kBF16, 1,
                                      packed_c[c % nf4_copies], am, r.out, r.in, y_nf4, stream),
          "nf4 gemv");
    };
    auto nf4_gemv = [&](int c) {
      const Nf4Absmax am{qabsmax_c[c % nf4_copies], absmax2_c[c % nf4_copies], code, offset};
      CheckKernel(nf4_gemv_cuda(x, FloatKind::kBF16, 1, packed_c[c % nf4_copies], am, r.out, r.in,
                                y_nf4, stream),
                  "nf4 gemv");
    };
    auto nf4_overlapped = [&](int c) {
      const Nf4Absmax am{qabsmax_c[c % nf4_copies], absmax2_c[c % nf4_copies], code, offset};
      CheckKernel(nf4_gemv_cuda_overlapped(x, FloatKind::kBF16, 1, packed_c[c % nf4_copies], am,
                                           r.out, r.in, y_nf4, stream),
                  "nf4 gemv overlapped");
    };
    auto dq_then_blas = [&](int c) {
      const int k = c % nf4_copies;
      CheckKernel(dynamic_quant8_dequantize_cuda(qabsmax_c[k], absmax2_c[k], code, blocks, 256,
                                                 offset, absmax_dq, stream),
                  "dq absmax");
      CheckKernel(nf4_dequantize_cuda(packed_c[k], absmax_dq, n, w_tmp, FloatKind::kBF16, stream),
                  "dequantize");
      blas_gemv(w_tmp, y_blas);
    };

    // Agreement: the NF4 GEMV against cuBLAS on the dequantized weight (both fp32 accumulation).
    nf4_gemv(0);
    blas_gemv(w_c[0], y_blas);
    Check(cudaStreamSynchronize(stream), "check");
    std::vector<__nv_bfloat16> a(r.out), b(r.out);
    Check(cudaMemcpy(a.data(), y_nf4, r.out * 2, cudaMemcpyDeviceToHost), "y");
    Check(cudaMemcpy(b.data(), y_blas, r.out * 2, cudaMemcpyDeviceToHost), "y");
    double max_diff = 0, max_ref = 0;
    for (int64_t i = 0; i < r.out; ++i) {
      max_diff =
          std::max(max_diff, std::fabs(double(__bfloat162float(a[i])) - __bfloat162float(b[i])));
      max_ref = std::max(max_ref, std::fabs(double(__bfloat162float(b[i]))));
    }

    bool g1 = false, g2 = false, g3 = false;
    const int reps = 50, samples = 41;
    const double t_nf4 = MedianMicros(stream, nf4_gemv, reps, samples, &g1);
    const double t_blas = MedianMicros(
        stream, [&](int c) { blas_gemv(w_c[c % bf16_copies], y_blas); }, reps, samples, &g2);
    const double t_dq = MedianMicros(stream, dq_then_blas, 10, 21, &g3);
    bool g4 = false;
    const double t_pdl = MedianMicros(stream, nf4_overlapped, reps, samples, &g4);
    const double t_r1 = MedianMicros(
        stream, [&](int c) { nf4_variant(1, c); }, reps, samples, &g4);
    const double t_r2 = MedianMicros(
        stream, [&](int c) { nf4_variant(2, c); }, reps, samples, &g4);
    const double t_r4 = MedianMicros(
        stream, [&](int c) { nf4_variant(4, c); }, reps, samples, &g4);
    const double io = (r.in + r.out) * 2.0;
    const double gbs_nf4 = (nf4_bytes + io) / t_nf4 / 1e3;
    const double gbs_pdl = (nf4_bytes + io) / t_pdl / 1e3;
    const double gbs_blas = (n * 2.0 + io) / t_blas / 1e3;
    std::printf(
        "%-14s %5lld x %5lld | %9.2f %7.0f %5.0f%% | %9.2f %7.0f %5.0f%% | %9.2f %7.0f | %11.2f | "
        "%7.2fx %7.2fx | %7.2f %7.2f %7.2f | %.2e%s\n",
        r.name, static_cast<long long>(r.out), static_cast<long long>(r.in), t_nf4, gbs_nf4,
        100.0 * gbs_nf4 / copy_gbs, t_pdl, gbs_pdl, 100.0 * gbs_pdl / copy_gbs, t_blas, gbs_blas,
        t_dq, t_blas / t_nf4, t_dq / t_nf4, t_r1, t_r2, t_r4, max_diff / max_ref,
        g1 && g2 && g3 && g4 ? "" : "  (some not graphed)");

    {
      // Agreement: the tensor-core kernel at 32 rows against cuBLAS on the dequantized weight.
      nf4_mma(0, kNf4MmaMaxRows, 0, false);
      blas_gemm(w_c[0], y_blas, kNf4MmaMaxRows);
      Check(cudaStreamSynchronize(stream), "check");
      std::vector<__nv_bfloat16> ma(kNf4MmaMaxRows * r.out), mb(kNf4MmaMaxRows * r.out);
      Check(cudaMemcpy(ma.data(), y_nf4, ma.size() * 2, cudaMemcpyDeviceToHost), "y");
      Check(cudaMemcpy(mb.data(), y_blas, mb.size() * 2, cudaMemcpyDeviceToHost), "y");
      double diff = 0, ref = 0;
      for (size_t i = 0; i < ma.size(); ++i) {
        diff = std::max(diff, std::fabs(double(__bfloat162float(ma[i])) - __bfloat162float(mb[i])));
        ref = std::max(ref, std::fabs(double(__bfloat162float(mb[i]))));
      }
      bool g = true, gi = false;
      MmaRow m;
      m.name = r.name;
      m.out = r.out;
      m.in = r.in;
      m.bytes = nf4_bytes + io;
      m.t1 = MedianMicros(
          stream, [&](int c) { nf4_mma(c, 1, 0, false); }, reps, samples, &gi);
      g = g && gi;
      m.t1_pdl = MedianMicros(
          stream, [&](int c) { nf4_mma(c, 1, 0, true); }, reps, samples, &gi);
      g = g && gi;
      constexpr int kGrids[5] = {16, 32, 64, 112, 128};
      for (int p = 0; p < 5; ++p) {
        m.t_blocks[p] = MedianMicros(
            stream, [&](int c) { nf4_mma(c, 1, kGrids[p], false); }, reps, samples, &gi);
        m.t32_blocks[p] = MedianMicros(
            stream, [&](int c) { nf4_mma(c, kNf4MmaMaxRows, kGrids[p], false); }, reps, samples,
            &gi);
      }
      m.t8 = MedianMicros(
          stream, [&](int c) { nf4_mma(c, 8, 0, false); }, reps, samples, &gi);
      m.t32 = MedianMicros(
          stream, [&](int c) { nf4_mma(c, kNf4MmaMaxRows, 0, false); }, reps, samples, &gi);
      g = g && gi;
      m.t32_blas = MedianMicros(
          stream, [&](int c) { blas_gemm(w_c[c % bf16_copies], y_blas, kNf4MmaMaxRows); }, reps,
          samples, &gi);
      m.t32_dq = MedianMicros(
          stream,
          [&](int c) {
            const int k = c % nf4_copies;
            CheckKernel(dynamic_quant8_dequantize_cuda(qabsmax_c[k], absmax2_c[k], code, blocks,
                                                       256, offset, absmax_dq, stream),
                        "dq absmax");
            CheckKernel(
                nf4_dequantize_cuda(packed_c[k], absmax_dq, n, w_tmp, FloatKind::kBF16, stream),
                "dequantize");
            blas_gemm(w_tmp, y_blas, kNf4MmaMaxRows);
          },
          10, 21, &gi);
      m.rel_diff = diff / ref;
      m.graphed = g;
      mma_rows.push_back(m);
#if defined(LORAD_NF4_MMA_TIMELINE)
      timelines.push_back(MmaTimelineRow(
          r.name, [&](int c) { nf4_mma(c, 1, 0, true); }, stream));
#endif
    }

    for (int c = 0; c < nf4_copies; ++c) {
      cudaFree(packed_c[c]);
      cudaFree(qabsmax_c[c]);
      cudaFree(absmax2_c[c]);
    }
    for (auto* p : w_c) cudaFree(p);
    for (void* p :
         {static_cast<void*>(w), static_cast<void*>(packed), static_cast<void*>(absmax),
          static_cast<void*>(absmax_dq), static_cast<void*>(qabsmax), static_cast<void*>(absmax2),
          static_cast<void*>(code), static_cast<void*>(x), static_cast<void*>(y_nf4),
          static_cast<void*>(y_blas), static_cast<void*>(w_tmp)}) {
      cudaFree(p);
    }
  }
  std::printf(
      "\nnf4 GB/s counts packed weights + 8-bit absmax + absmax2 + x + y; bf16 GB/s the bf16\n"
      "weight + x + y. 'vs bf16' = bf16 cuBLAS time / NF4 time (above 1: NF4 faster).\n"
      "r/w=1/2/4: the NF4 GEMV (plain launches) with 1, 2 or 4 output rows per warp, us\n"
      "(nf4_gemv_cuda picks rows per warp and split-K parts from the shape).\n");
  PrintMmaTable(mma_rows, copy_gbs);
  if (only == nullptr) PrintEngineLayer(stream, copy_gbs);
#if defined(LORAD_NF4_MMA_TIMELINE)
  PrintMmaTimeline(timelines);
#endif
  cublasDestroy(blas);
  return 0;
}
