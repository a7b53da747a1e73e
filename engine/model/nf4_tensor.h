// Nf4Tensor: a 2-D weight held as bitsandbytes NF4 with double-quantized absmax, on one device.
// The torch-facing wrapper around kernels/nf4.h, kernels/dynamic_quant8.h and
// kernels/nf4_gemv.h: CPU references on CPU tensors, CUDA kernels on CUDA tensors.
//
// Storage (bitsandbytes quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)):
//   packed   [ceil(numel/2)]          uint8  two 4-bit codes per byte, first element high nibble
//   qabsmax  [blocks = ceil(numel/64)] uint8 absmax - offset, 8-bit dynamic codes, blocks of 256
//   absmax2  [ceil(blocks/256)]       f32    the second-level scales
//   code2    [256]                    f32    the 8-bit code book (create_dynamic_map(signed=True))
//   offset                            f32    mean of the first-level absmax (host value)
// Quantize produces the bytes bitsandbytes' CPU quantize_4bit produces for the same weight, on
// either device (the offset is always the CPU mean of the absmax, as bitsandbytes' CPU path
// computes it), so a model quantized on the GPU at load equals one quantized by bitsandbytes.
//
// Errors: Quantize and FromBitsandbytes take user data (weights, checkpoints) and return a
// Status; Dequantize and Linear are model-internal and throw c10::Error on misuse (wrong
// in_features), which the engine boundary catches.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace lorad::engine {

struct Nf4Tensor {
  torch::Tensor packed;
  torch::Tensor qabsmax;
  torch::Tensor absmax2;
  torch::Tensor code2;
  float offset = 0.f;
  std::vector<int64_t> shape;               // [out_features, in_features]
  torch::ScalarType dtype = torch::kFloat;  // the weight's dtype before quantization

  // Quantizes a 2-D float weight (fp32, bf16 or fp16; any numel) on its device.
  static absl::StatusOr<Nf4Tensor> Quantize(const torch::Tensor& weight);

  // Reads a weight that bitsandbytes quantized, in the state-dict layout transformers saves:
  //   <name>                                    uint8 packed weight (any shape)
  //   <name>.absmax                             uint8 quantized absmax
  //   <name>.quant_map                          f32 [16] NF4 code book
  //   <name>.nested_absmax                      f32 second-level scales
  //   <name>.nested_quant_map                   f32 [256] 8-bit code book
  //   <name>.quant_state.bitsandbytes__nf4      uint8 bytes of a JSON object: shape, dtype,
  //                                             blocksize, nested_blocksize, nested_offset, ...
  // `name` is the weight's key, e.g. "model.layers.0.self_attn.q_proj.weight". The parts stay on
  // their device (use To to move). Errors name the missing or inconsistent part.
  static absl::StatusOr<Nf4Tensor> FromBitsandbytes(
      const std::map<std::string, torch::Tensor>& parts, const std::string& name);

  // The weight in `dtype` (a float dtype), shaped `shape`, on the tensor's device.
  torch::Tensor Dequantize(torch::ScalarType dtype) const;
  // The first-level absmax, [blocks] f32: code2[qabsmax] * absmax2 + offset.
  torch::Tensor Absmax() const;
  // y = x @ W^T for x [..., in_features] -> [..., out_features], same dtype as x. On CUDA, with at
  // most SetGemvMaxRows' rows and no gradient to record, a kernel reads the packed weight
  // directly: the tensor-core kernel (kernels/nf4_mma.h: bf16/fp16, in_features % 256 == 0), else
  // the 4-bit GEMV (in_features % 64 == 0, in chunks of kernels::kNf4GemvMaxRows rows); otherwise
  // dequantize + matmul (on CPU always, with the CPU reference dequantization).
  torch::Tensor Linear(const torch::Tensor& x) const;
  // Linear of several weights with the same in_features on one x (q, k, v; gate, up): where
  // Linear would take the tensor-core kernel for each, one grouped launch for all
  // (kernels/nf4_mma_group_cuda, at most kernels::kNf4MmaMaxTargets weights); else one Linear
  // each. Same results as Linear up to the order of fp32 sums.
  static std::vector<torch::Tensor> LinearGroup(const std::vector<const Nf4Tensor*>& weights,
                                                const torch::Tensor& x);
  // The MLP's activation silu(x @ gate^T) * (x @ up^T) in one tensor-core launch
  // (kernels/nf4_mma_silu_mul_cuda: gate and up never reach memory, no activation kernel), where
  // LinearGroup would take that kernel for both and x is bf16; undefined otherwise (the caller
  // runs LinearGroup and its activation). The same values as those two steps up to the order of
  // the fp32 sums.
  static torch::Tensor SiluMulProduct(const Nf4Tensor& gate, const Nf4Tensor& up,
                                      const torch::Tensor& x);
  // The most rows of x Linear gives those kernels (default kernels::kNf4MmaMaxRows, one
  // tensor-core launch); benchmarks set it to compare with dequantize + cuBLAS. Process-wide.
  static void SetGemvMaxRows(int64_t rows);
  // A copy with every part on `device`.
  Nf4Tensor To(const torch::Device& device) const;

  torch::Device device() const { return packed.device(); }
  int64_t out_features() const { return shape.at(0); }
  int64_t in_features() const { return shape.at(1); }
  int64_t numel() const;
  int64_t bytes() const;  // device bytes of all parts (the host-side offset not counted)
};

}  // namespace lorad::engine
