#include "engine/model/nf4_tensor.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/json_file.h"
#include "engine/model/kernel_launch.h"
#include "kernels/dynamic_quant8.h"
#include "kernels/nf4.h"
#include "kernels/nf4_gemv.h"
#include "kernels/nf4_mma.h"
#include "nlohmann/json.hpp"

#if defined(LORAD_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace lorad::engine {
namespace {

using kernels::FloatKind;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

torch::Tensor DynamicMapOn(const torch::Device& device) {
  return torch::from_blob(const_cast<float*>(kernels::kDynamicMapSigned), {256}, torch::kFloat)
      .to(device, /*non_blocking=*/false, /*copy=*/true);
}

#if defined(LORAD_WITH_CUDA)
// Up to this many rows of x, Linear reads the packed weight directly: the tensor-core kernel
// (kernels/nf4_mma.h) for bf16/fp16 x, else the GEMV kernel in chunks of kNf4GemvMaxRows; more
// rows dequantize once and multiply with cuBLAS. (Before the tensor-core kernel, four chunked
// GEMV launches at batch 32 ran 813 tokens/s against dequantize + cuBLAS's 1,198:
// bench/results/2026-12-02-h200-generation-8b-run1.txt.)
std::atomic<int64_t> gemv_max_rows{kernels::kNf4MmaMaxRows};
#endif

// Returns the quantized tensor or throws c10::Error; Quantize turns that into a Status.
Nf4Tensor QuantizeOrThrow(const torch::Tensor& weight) {
  const int64_t n = weight.numel();
  const int64_t blocks = kernels::Nf4Blocks(n);
  const int64_t blocks2 =
      (blocks + kernels::kDynamicQuant8BlockSize - 1) / kernels::kDynamicQuant8BlockSize;
  const torch::Device device = weight.device();
  const auto u8 = torch::TensorOptions().dtype(torch::kUInt8).device(device);
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(device);

  Nf4Tensor t;
  t.shape = weight.sizes().vec();
  t.dtype = weight.scalar_type();
  t.packed = torch::empty({kernels::Nf4PackedBytes(n)}, u8);
  t.qabsmax = torch::empty({blocks}, u8);
  t.absmax2 = torch::empty({blocks2}, f32);
  t.code2 = DynamicMapOn(device);
  torch::Tensor absmax = torch::empty({blocks}, f32);

  if (device.is_cpu()) {
    const torch::Tensor w = weight.to(torch::kFloat).contiguous();  // exact for bf16 and fp16
    kernels::nf4_quantize_cpu(w.data_ptr<float>(), n, t.packed.data_ptr<uint8_t>(),
                              absmax.data_ptr<float>());
  } else {
#if defined(LORAD_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(device);
    const torch::Tensor w = weight.contiguous();
    CheckLaunch(kernels::nf4_quantize_cuda(w.data_ptr(), *FloatKindOf(w.scalar_type()), n,
                                           t.packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                           CurrentStream(device)),
                "nf4_quantize_cuda");
#endif
  }

  // bitsandbytes computes offset = absmax.mean() with torch on the CPU; the same call on the same
  // values gives the same float (for any device the weight came from), and every qabsmax byte
  // depends on it.
  t.offset = absmax.cpu().mean().item<float>();

  if (device.is_cpu()) {
    kernels::dynamic_quant8_quantize_cpu(
        absmax.data_ptr<float>(), blocks, t.offset, kernels::kDynamicQuant8BlockSize,
        t.code2.data_ptr<float>(), t.qabsmax.data_ptr<uint8_t>(), t.absmax2.data_ptr<float>());
  } else {
#if defined(LORAD_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(device);
    CheckLaunch(kernels::dynamic_quant8_quantize_cuda(
                    absmax.data_ptr<float>(), blocks, t.offset, kernels::kDynamicQuant8BlockSize,
                    t.code2.data_ptr<float>(), t.qabsmax.data_ptr<uint8_t>(),
                    t.absmax2.data_ptr<float>(), CurrentStream(device)),
                "dynamic_quant8_quantize_cuda");
#endif
  }
  return t;
}

absl::Status CheckPart(const torch::Tensor& t, const std::string& key, torch::ScalarType dtype,
                       int64_t numel) {
  if (t.scalar_type() != dtype) {
    return absl::InvalidArgumentError(absl::StrCat("bitsandbytes weight part '", key, "' is ",
                                                   c10::toString(t.scalar_type()), ", expected ",
                                                   c10::toString(dtype)));
  }
  if (t.numel() != numel) {
    return absl::InvalidArgumentError(absl::StrCat("bitsandbytes weight part '", key, "' has ",
                                                   t.numel(), " values, expected ", numel));
  }
  return absl::OkStatus();
}

absl::StatusOr<torch::ScalarType> DTypeFromName(const std::string& name, const std::string& key) {
  if (name == "float32") return torch::kFloat;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kHalf;
  return absl::InvalidArgumentError(
      absl::StrCat("'", key, "': dtype '", name, "' is not float32, bfloat16 or float16"));
}

absl::StatusOr<Nf4Tensor> FromBitsandbytesOrThrow(const std::map<std::string, torch::Tensor>& parts,
                                                  const std::string& name) {
  auto find = [&](const std::string& suffix) -> const torch::Tensor* {
    const auto it = parts.find(name + suffix);
    return it == parts.end() ? nullptr : &it->second;
  };
  const torch::Tensor* packed = find("");
  if (packed == nullptr) {
    return absl::NotFoundError(absl::StrCat("checkpoint has no tensor '", name, "'"));
  }
  const std::string state_key = name + ".quant_state.bitsandbytes__nf4";
  const torch::Tensor* state = find(".quant_state.bitsandbytes__nf4");
  if (state == nullptr) {
    if (find(".quant_state.bitsandbytes__fp4") != nullptr) {
      return absl::UnimplementedError(absl::StrCat(
          "'", name, "' is quantized as FP4; lorad reads NF4 (bnb_4bit_quant_type=\"nf4\")"));
    }
    return absl::NotFoundError(absl::StrCat(
        "'", name, "' has no '", state_key,
        "': not a bitsandbytes 4-bit weight, or saved by a bitsandbytes older than 0.41"));
  }
  if (state->scalar_type() != torch::kUInt8) {
    return absl::InvalidArgumentError(absl::StrCat("'", state_key, "' is not uint8"));
  }
  const torch::Tensor state_bytes = state->cpu().contiguous();
  const std::string text(reinterpret_cast<const char*>(state_bytes.data_ptr<uint8_t>()),
                         static_cast<size_t>(state_bytes.numel()));
  if (auto s = CheckJsonNesting(text, "'" + state_key + "'"); !s.ok()) return s;
  const nlohmann::json js = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!js.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("'", state_key, "' is not a JSON object"));
  }
  // A field's value of the type it must have; "" or 0 for one of another type (refused below).
  auto text_field = [&](const char* field) {
    auto it = js.find(field);
    return it != js.end() && it->is_string() ? it->get<std::string>() : std::string();
  };
  auto int_field = [&](const char* field) {
    auto it = js.find(field);
    return it != js.end() && it->is_number_integer() ? it->get<int64_t>() : int64_t{0};
  };
  auto field_error = [&](const char* field, const char* expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", state_key, "': field '", field, "' ", expected, " (got ",
                     js.contains(field) ? js[field].dump() : "none", ")"));
  };
  if (text_field("quant_type") != "nf4") return field_error("quant_type", "!= nf4");
  if (!js.contains("blocksize") || !js["blocksize"].is_number_integer() ||
      js["blocksize"].get<int64_t>() != kernels::kNf4BlockSize) {
    return absl::UnimplementedError(
        absl::StrCat("'", state_key, "': blocksize ",
                     js.contains("blocksize") ? js["blocksize"].dump() : "missing",
                     " is not supported; lorad reads bitsandbytes' default blocksize 64"));
  }
  if (!js.contains("shape") || !js["shape"].is_array() || js["shape"].size() != 2) {
    return field_error("shape", "must be [out_features, in_features]");
  }
  std::vector<int64_t> shape;
  for (const auto& d : js["shape"]) {
    if (!d.is_number_integer() || d.get<int64_t>() <= 0) {
      return field_error("shape", "must hold positive integers");
    }
    shape.push_back(d.get<int64_t>());
  }
  if (shape[0] > (int64_t{1} << 40) / shape[1]) return field_error("shape", "is too large");
  auto dtype = DTypeFromName(text_field("dtype"), state_key);
  if (!dtype.ok()) return dtype.status();

  const torch::Tensor* nested_absmax = find(".nested_absmax");
  if (nested_absmax == nullptr || !js.contains("nested_offset")) {
    return absl::UnimplementedError(absl::StrCat(
        "'", name,
        "' was saved without double quantization (bnb_4bit_use_double_quant=False); lorad reads "
        "double-quantized NF4 only: re-quantize from the original weights"));
  }
  if (!js["nested_offset"].is_number()) return field_error("nested_offset", "must be a number");
  if (int_field("nested_blocksize") != kernels::kDynamicQuant8BlockSize) {
    return field_error("nested_blocksize", "must be 256");
  }
  if (text_field("nested_dtype") != "float32") {
    return field_error("nested_dtype", "must be float32");
  }
  const torch::Tensor* absmax = find(".absmax");
  const torch::Tensor* quant_map = find(".quant_map");
  const torch::Tensor* nested_quant_map = find(".nested_quant_map");
  for (const auto& [part, suffix] :
       {std::pair{absmax, ".absmax"}, std::pair{quant_map, ".quant_map"},
        std::pair{nested_quant_map, ".nested_quant_map"}}) {
    if (part == nullptr) {
      return absl::NotFoundError(absl::StrCat("checkpoint has no tensor '", name, suffix, "'"));
    }
  }

  const int64_t n = shape[0] * shape[1];
  const int64_t blocks = kernels::Nf4Blocks(n);
  // quant_storage other than uint8 (e.g. bf16 for FSDP) holds the same bytes.
  torch::Tensor packed_u8 = packed->contiguous().view(torch::kUInt8).flatten();
  if (packed_u8.numel() != kernels::Nf4PackedBytes(n)) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", name, "' holds ", packed_u8.numel(), " bytes, but its quant_state shape ",
                     ShapeString(shape), " needs ", kernels::Nf4PackedBytes(n)));
  }
  if (auto s = CheckPart(*absmax, name + ".absmax", torch::kUInt8, blocks); !s.ok()) return s;
  if (auto s = CheckPart(*quant_map, name + ".quant_map", torch::kFloat, 16); !s.ok()) return s;
  if (auto s =
          CheckPart(*nested_absmax, name + ".nested_absmax", torch::kFloat, (blocks + 255) / 256);
      !s.ok()) {
    return s;
  }
  if (auto s = CheckPart(*nested_quant_map, name + ".nested_quant_map", torch::kFloat, 256);
      !s.ok()) {
    return s;
  }
  const torch::Tensor code = quant_map->cpu().contiguous();
  if (std::memcmp(code.data_ptr<float>(), kernels::kNf4Code, sizeof(kernels::kNf4Code)) != 0) {
    return absl::UnimplementedError(absl::StrCat(
        "'", name, ".quant_map' is not the NF4 code book; lorad reads standard NF4 only"));
  }

  const torch::Device device = packed->device();
  Nf4Tensor t;
  t.shape = shape;
  t.dtype = *dtype;
  t.packed = packed_u8.to(device);
  t.qabsmax = absmax->flatten().contiguous().to(device);
  t.absmax2 = nested_absmax->flatten().contiguous().to(device);
  t.code2 = nested_quant_map->flatten().contiguous().to(device);
  // bitsandbytes writes the fp32 offset's exact value as a JSON double.
  t.offset = static_cast<float>(js["nested_offset"].get<double>());
  return t;
}

}  // namespace

absl::StatusOr<Nf4Tensor> Nf4Tensor::Quantize(const torch::Tensor& weight) {
  if (!weight.defined()) return absl::InvalidArgumentError("Nf4Tensor::Quantize: no tensor");
  if (!FloatKindOf(weight.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat("Nf4Tensor::Quantize: weight is ",
                                                   c10::toString(weight.scalar_type()),
                                                   "; NF4 quantizes float32, bfloat16 or float16"));
  }
  if (weight.dim() != 2 || weight.numel() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Nf4Tensor::Quantize: weight shape ", ShapeString(weight.sizes().vec()),
                     " is not a non-empty [out_features, in_features] matrix"));
  }
  if (!weight.device().is_cpu()) {
#if defined(LORAD_WITH_CUDA)
    if (!weight.device().is_cuda()) {
#endif
      return absl::UnimplementedError(absl::StrCat("Nf4Tensor::Quantize: no NF4 kernels for ",
                                                   weight.device().str(), " in this build"));
#if defined(LORAD_WITH_CUDA)
    }
#endif
  }
  try {
    return QuantizeOrThrow(weight);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("Nf4Tensor::Quantize: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<Nf4Tensor> Nf4Tensor::FromBitsandbytes(
    const std::map<std::string, torch::Tensor>& parts, const std::string& name) {
  try {
    return FromBitsandbytesOrThrow(parts, name);
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("reading bitsandbytes weight '", name, "': ", e.what_without_backtrace()));
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("reading bitsandbytes weight '", name, "': its quant_state: ", e.what()));
  }
}

int64_t Nf4Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t Nf4Tensor::bytes() const {
  int64_t total = 0;
  for (const torch::Tensor* t : {&packed, &qabsmax, &absmax2, &code2}) {
    if (t->defined()) total += t->numel() * static_cast<int64_t>(t->element_size());
  }
  return total;
}

torch::Tensor Nf4Tensor::Absmax() const {
  const int64_t blocks = qabsmax.numel();
  torch::Tensor absmax = torch::empty({blocks}, absmax2.options());
  if (device().is_cpu()) {
    kernels::dynamic_quant8_dequantize_cpu(
        qabsmax.data_ptr<uint8_t>(), absmax2.data_ptr<float>(), code2.data_ptr<float>(), blocks,
        kernels::kDynamicQuant8BlockSize, offset, absmax.data_ptr<float>());
    return absmax;
  }
#if defined(LORAD_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(device());
  CheckLaunch(kernels::dynamic_quant8_dequantize_cuda(
                  qabsmax.data_ptr<uint8_t>(), absmax2.data_ptr<float>(), code2.data_ptr<float>(),
                  blocks, kernels::kDynamicQuant8BlockSize, offset, absmax.data_ptr<float>(),
                  CurrentStream(device())),
              "dynamic_quant8_dequantize_cuda");
  return absmax;
#else
  TORCH_CHECK(false, "Nf4Tensor: no NF4 kernels for ", device().str(), " in this build");
#endif
}

#if defined(LORAD_WITH_CUDA)
namespace {

// The kernels' view of w's double-quantized absmax.
kernels::Nf4Absmax AbsmaxOf(const Nf4Tensor& w) {
  kernels::Nf4Absmax absmax;
  absmax.qabsmax = w.qabsmax.data_ptr<uint8_t>();
  absmax.absmax2 = w.absmax2.data_ptr<float>();
  absmax.code2 = w.code2.data_ptr<float>();
  absmax.offset = w.offset;
  return absmax;
}

}  // namespace
#endif

torch::Tensor Nf4Tensor::Dequantize(torch::ScalarType out_dtype) const {
  TORCH_CHECK(packed.defined(), "Nf4Tensor::Dequantize: empty tensor");
  TORCH_CHECK(c10::isFloatingType(out_dtype), "Nf4Tensor::Dequantize: ", c10::toString(out_dtype),
              " is not a float dtype");
  const int64_t n = numel();
  if (device().is_cpu()) {
    const torch::Tensor absmax = Absmax();
    torch::Tensor out = torch::empty({n}, absmax.options());
    kernels::nf4_dequantize_cpu(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), n,
                                out.data_ptr<float>());
    return out.view(shape).to(out_dtype);
  }
#if defined(LORAD_WITH_CUDA)
  // One kernel rebuilds each block's absmax from the double-quantized codes as it goes.
  const auto kind = FloatKindOf(out_dtype);
  const auto kernel_dtype = kind ? out_dtype : torch::kFloat;
  torch::Tensor out = torch::empty({n}, absmax2.options().dtype(kernel_dtype));
  const c10::cuda::CUDAGuard guard(device());
  CheckLaunch(kernels::nf4_dequantize_double_cuda(packed.data_ptr<uint8_t>(), AbsmaxOf(*this), n,
                                                  out.data_ptr(), kind.value_or(FloatKind::kF32),
                                                  CurrentStream(device())),
              "nf4_dequantize_double_cuda");
  return out.view(shape).to(out_dtype);
#else
  TORCH_CHECK(false, "Nf4Tensor: no NF4 kernels for ", device().str(), " in this build");
#endif
}

void Nf4Tensor::SetGemvMaxRows(int64_t rows) {
#if defined(LORAD_WITH_CUDA)
  gemv_max_rows.store(rows);
#else
  (void)rows;
#endif
}

namespace {

#if defined(LORAD_WITH_CUDA)
// x made contiguous and 16-byte aligned (the kernels' vector loads); a view may start
// mid-allocation.
torch::Tensor KernelInput(const torch::Tensor& x) {
  torch::Tensor x2 = x.contiguous();
  if (reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 != 0) x2 = x2.clone();
  return x2;
}

torch::Tensor OutputFor(const torch::Tensor& x, int64_t out_features) {
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = out_features;
  return torch::empty(out_shape, x.options());
}

// Decode batches of up to gemv_max_rows rows with no gradient to record, on CUDA: what the 4-bit
// kernels (tensor-core product or GEMV) take instead of dequantize + matmul.
bool ForDecodeKernels(const Nf4Tensor& w, const torch::Tensor& x) {
  return w.device().is_cuda() && FloatKindOf(x.scalar_type()) &&
         !(torch::GradMode::is_enabled() && x.requires_grad()) &&
         x.numel() / w.in_features() <= gemv_max_rows.load(std::memory_order_relaxed);
}

// One weight of a tensor-core launch, its output at y.
kernels::Nf4MmaTarget TargetOf(const Nf4Tensor& w, void* y) {
  kernels::Nf4MmaTarget target;
  target.packed = w.packed.data_ptr<uint8_t>();
  target.absmax = AbsmaxOf(w);
  target.out_features = w.out_features();
  target.y = y;
  return target;
}

// y = x @ W^T for each of `weights` (sharing x and in_features) in one tensor-core launch; empty
// when that launch does not apply.
std::vector<torch::Tensor> MmaProducts(const std::vector<const Nf4Tensor*>& weights,
                                       const torch::Tensor& x) {
  const Nf4Tensor& first = *weights.front();
  const int64_t rows = x.numel() / first.in_features();
  const auto kind = FloatKindOf(x.scalar_type());
  if (weights.size() > static_cast<size_t>(kernels::kNf4MmaMaxTargets) ||
      !ForDecodeKernels(first, x) ||
      !kernels::nf4_mma_cuda_supports(rows, first.in_features(), *kind)) {
    return {};
  }
  const c10::cuda::CUDAGuard guard(first.device());
  const torch::Tensor x2 = KernelInput(x);
  std::vector<torch::Tensor> ys;
  kernels::Nf4MmaTarget targets[kernels::kNf4MmaMaxTargets];
  for (size_t i = 0; i < weights.size(); ++i) {
    ys.push_back(OutputFor(x, weights[i]->out_features()));
    targets[i] = TargetOf(*weights[i], ys.back().data_ptr());
  }
  // Overlapped (programmatic dependent launch): the kernel fetches its weights while the kernel
  // before it finishes, and reads x only after; nothing on the stream writes weights.
  CheckLaunch(kernels::nf4_mma_group_cuda(x2.data_ptr(), *kind, rows, targets,
                                          static_cast<int>(weights.size()), first.in_features(),
                                          CurrentStream(first.device()), /*overlapped=*/true),
              "nf4_mma_group_cuda");
  return ys;
}
#endif

void CheckInput(const Nf4Tensor& w, const torch::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.in_features(), "Nf4Tensor::Linear: x has shape ",
              x.sizes(), ", expected [..., ", w.in_features(), "]");
  TORCH_CHECK(x.device() == w.device(), "Nf4Tensor::Linear: x is on ", x.device().str(),
              ", the weight on ", w.device().str());
}

}  // namespace

torch::Tensor Nf4Tensor::Linear(const torch::Tensor& x) const {
  CheckInput(*this, x);
#if defined(LORAD_WITH_CUDA)
  // Decode batches of up to gemv_max_rows rows: one tensor-core launch, or the GEMV kernel
  // kNf4GemvMaxRows rows a launch.
  if (std::vector<torch::Tensor> ys = MmaProducts({this}, x); !ys.empty()) return ys.front();
  const int64_t rows = x.numel() / in_features();
  if (ForDecodeKernels(*this, x) &&
      kernels::nf4_gemv_cuda_supports(std::min<int64_t>(rows, kernels::kNf4GemvMaxRows),
                                      in_features())) {
    const c10::cuda::CUDAGuard guard(device());
    const torch::Tensor x2 = KernelInput(x);
    torch::Tensor y = OutputFor(x, out_features());
    const kernels::Nf4Absmax absmax = AbsmaxOf(*this);
    const auto kind = FloatKindOf(x.scalar_type());
    const int64_t element = static_cast<int64_t>(x2.element_size());
    for (int64_t start = 0; start < rows; start += kernels::kNf4GemvMaxRows) {
      const int64_t chunk = std::min<int64_t>(kernels::kNf4GemvMaxRows, rows - start);
      CheckLaunch(
          kernels::nf4_gemv_cuda(
              static_cast<const char*>(x2.data_ptr()) + start * in_features() * element, *kind,
              chunk, packed.data_ptr<uint8_t>(), absmax, out_features(), in_features(),
              static_cast<char*>(y.data_ptr()) + start * out_features() * element,
              CurrentStream(device())),
          "nf4_gemv_cuda");
    }
    return y;
  }
#endif
  return torch::matmul(x, Dequantize(x.scalar_type()).t());
}

std::vector<torch::Tensor> Nf4Tensor::LinearGroup(const std::vector<const Nf4Tensor*>& weights,
                                                  const torch::Tensor& x) {
  TORCH_CHECK(!weights.empty(), "Nf4Tensor::LinearGroup: no weights");
  for (const Nf4Tensor* w : weights) CheckInput(*w, x);
#if defined(LORAD_WITH_CUDA)
  if (weights.size() > 1) {
    if (std::vector<torch::Tensor> ys = MmaProducts(weights, x); !ys.empty()) return ys;
  }
#endif
  std::vector<torch::Tensor> ys;
  for (const Nf4Tensor* w : weights) ys.push_back(w->Linear(x));
  return ys;
}

torch::Tensor Nf4Tensor::SiluMulProduct(const Nf4Tensor& gate, const Nf4Tensor& up,
                                        const torch::Tensor& x) {
  CheckInput(gate, x);
  CheckInput(up, x);
#if defined(LORAD_WITH_CUDA)
  const int64_t rows = x.numel() / gate.in_features();
  if (x.scalar_type() == torch::kBFloat16 && gate.shape == up.shape && ForDecodeKernels(gate, x) &&
      kernels::nf4_mma_cuda_supports(rows, gate.in_features(), kernels::FloatKind::kBF16)) {
    const c10::cuda::CUDAGuard guard(gate.device());
    const torch::Tensor x2 = KernelInput(x);
    torch::Tensor out = OutputFor(x, gate.out_features());
    // Overlapped, as MmaProducts.
    CheckLaunch(kernels::nf4_mma_silu_mul_cuda(x2.data_ptr(), kernels::FloatKind::kBF16, rows,
                                               TargetOf(gate, nullptr), TargetOf(up, nullptr),
                                               gate.in_features(), out.data_ptr(),
                                               CurrentStream(gate.device()), /*overlapped=*/true),
                "nf4_mma_silu_mul_cuda");
    return out;
  }
#endif
  return torch::Tensor();
}

Nf4Tensor Nf4Tensor::To(const torch::Device& target) const {
  Nf4Tensor t = *this;
  t.packed = packed.to(target);
  t.qabsmax = qabsmax.to(target);
  t.absmax2 = absmax2.to(target);
  t.code2 = code2.to(target);
  return t;
}

}  // namespace lorad::engine
