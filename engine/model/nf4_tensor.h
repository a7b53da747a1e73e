// Nf4Tensor: a 2-D weight held as bitsandbytes NF4 with double-quantized absmax, on one device.
// The torch-facing wrapper around kernels/nf4.h (CPU reference or CUDA).
//
// Storage (bitsandbytes quantize_4bit(quant_type="nf4", compress_statistics=True)):
//   packed   [numel/2]        uint8   two 4-bit codes per byte, first element in the high nibble
//   qabsmax  [numel/64]       uint8   absmax - offset, 8-bit dynamic-quantized in blocks of 256
//   absmax2  [ceil(numel/64/256)] f32 the second-level scales
//   code2    [256]            f32     the 8-bit dynamic code book (create_dynamic_map(signed))
//   offset                    f32     mean of the first-level absmax
#pragma once

#include <torch/torch.h>

#include <vector>

namespace lorad::engine {

struct Nf4Tensor {
  torch::Tensor packed;
  torch::Tensor qabsmax;
  torch::Tensor absmax2;
  torch::Tensor code2;
  float offset = 0.f;
  std::vector<int64_t> shape;  // [out_features, in_features]

  // Quantizes a float weight (any float dtype; numel a multiple of 64) on its device.
  static Nf4Tensor Quantize(const torch::Tensor& weight);
  // The weight in `dtype` ([out, in]) on the tensor's device.
  torch::Tensor Dequantize(torch::ScalarType dtype) const;
  // y = x @ W^T for x [..., in] without materializing W where a kernel exists (decode GEMV on
  // CUDA); elsewhere dequantize + matmul. Same dtype as x.
  torch::Tensor Linear(const torch::Tensor& x) const;
  int64_t numel() const;
  int64_t bytes() const;  // device bytes of all parts
};

}  // namespace lorad::engine
