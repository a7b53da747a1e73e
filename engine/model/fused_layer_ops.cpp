#include "engine/model/fused_layer_ops.h"

#include <atomic>

#include "engine/model/kernel_launch.h"
#include "kernels/layer_ops.h"

#if defined(LORAD_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif

namespace lorad::engine {
namespace {

std::atomic<FusedLayerOps> mode{FusedLayerOps::kCuda};
thread_local int torch_ops_scopes = 0;  // ScopedTorchLayerOps alive on this thread

// fp32 or bf16: UseFusedLayerOps admits nothing else.
kernels::FloatKind KindOf(const torch::Tensor& t) { return *FloatKindOf(t.scalar_type()); }

}  // namespace

bool UseFusedLayerOps(const torch::Tensor& x) {
  const FusedLayerOps m = mode.load(std::memory_order_relaxed);
#if defined(LORAD_WITH_CUDA)
  const bool device = x.is_cuda() || (x.is_cpu() && m == FusedLayerOps::kAlsoOnCpu);
#else
  const bool device = x.is_cpu() && m == FusedLayerOps::kAlsoOnCpu;
#endif
  return m != FusedLayerOps::kOff && torch_ops_scopes == 0 && device &&
         (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16) &&
         !(torch::GradMode::is_enabled() && x.requires_grad());
}

void SetFusedLayerOps(FusedLayerOps m) { mode.store(m); }

ScopedTorchLayerOps::ScopedTorchLayerOps() { ++torch_ops_scopes; }
ScopedTorchLayerOps::~ScopedTorchLayerOps() { --torch_ops_scopes; }

torch::Tensor FusedRmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const torch::Tensor xc = x.contiguous();
  const torch::Tensor w = weight.to(x.scalar_type()).contiguous();
  torch::Tensor out = torch::empty_like(xc);
  const int64_t width = x.size(-1);
  if (xc.is_cpu()) {
    kernels::rms_norm_cpu(xc.data_ptr(), w.data_ptr(), KindOf(xc), xc.numel() / width, width,
                          static_cast<float>(eps), out.data_ptr());
    return out;
  }
#if defined(LORAD_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(x.device());
  CheckLaunch(
      kernels::rms_norm_cuda(xc.data_ptr(), w.data_ptr(), KindOf(xc), xc.numel() / width, width,
                             static_cast<float>(eps), out.data_ptr(), CurrentStream(xc.device())),
      "rms_norm_cuda");
#endif
  return out;
}

torch::Tensor FusedRotary(const torch::Tensor& x, const torch::Tensor& cos,
                          const torch::Tensor& sin) {
  const torch::Tensor xc = x.contiguous();
  const torch::Tensor c = cos.to(x.scalar_type()).contiguous();
  const torch::Tensor s = sin.to(x.scalar_type()).contiguous();
  torch::Tensor out = torch::empty_like(xc);
  const int64_t rows = x.size(0) * x.size(1);
  if (xc.is_cpu()) {
    kernels::rotary_cpu(xc.data_ptr(), c.data_ptr(), s.data_ptr(), KindOf(xc), rows, x.size(2),
                        x.size(3), out.data_ptr());
    return out;
  }
#if defined(LORAD_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(x.device());
  CheckLaunch(
      kernels::rotary_cuda(xc.data_ptr(), c.data_ptr(), s.data_ptr(), KindOf(xc), rows, x.size(2),
                           x.size(3), out.data_ptr(), CurrentStream(xc.device())),
      "rotary_cuda");
#endif
  return out;
}

torch::Tensor FusedSiluMul(const torch::Tensor& gate, const torch::Tensor& up) {
  const torch::Tensor g = gate.contiguous();
  const torch::Tensor u = up.to(gate.scalar_type()).contiguous();
  torch::Tensor out = torch::empty_like(g);
  if (g.is_cpu()) {
    kernels::silu_mul_cpu(g.data_ptr(), u.data_ptr(), KindOf(g), g.numel(), out.data_ptr());
    return out;
  }
#if defined(LORAD_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(gate.device());
  CheckLaunch(kernels::silu_mul_cuda(g.data_ptr(), u.data_ptr(), KindOf(g), g.numel(),
                                     out.data_ptr(), CurrentStream(g.device())),
              "silu_mul_cuda");
#endif
  return out;
}

}  // namespace lorad::engine
