// Nf4Tensor against bitsandbytes on the CPU (tests/parity/reference_nf4.py): the quantized bytes,
// the double-quantization state and the dequantized weights must be identical, bit for bit, and a
// Linear4bit state dict as transformers saves it must load to bitsandbytes' weight.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>

#include "engine/model/nf4_tensor.h"
#include "engine/model/safetensors.h"
#include "kernels/dynamic_quant8.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

std::string Dir() { return std::string(std::getenv("LORAD_PARITY_DIR")) + "/nf4/"; }

torch::ScalarType TorchDType(DType d) {
  switch (d) {
    case DType::kF32:
      return torch::kFloat;
    case DType::kBF16:
      return torch::kBFloat16;
    case DType::kF16:
      return torch::kHalf;
    case DType::kU8:
      return torch::kUInt8;
    default:
      ADD_FAILURE() << "unexpected dtype " << DTypeName(d);
      return torch::kFloat;
  }
}

// Every tensor of a safetensors file, copied out of the mapping.
std::map<std::string, torch::Tensor> Load(const std::string& file) {
  auto f = SafetensorsFile::Open(Dir() + file);
  EXPECT_TRUE(f.ok()) << f.status();
  std::map<std::string, torch::Tensor> out;
  if (!f.ok()) return out;
  for (const TensorView& v : (*f)->tensors()) {
    torch::Tensor t = torch::empty(v.shape, TorchDType(v.dtype));
    std::memcpy(t.data_ptr(), v.data, v.nbytes);
    out[v.name] = t;
  }
  return out;
}

nlohmann::json LoadJson(const std::string& file) {
  std::ifstream in(Dir() + file);
  EXPECT_TRUE(in) << "missing reference " << Dir() + file;
  return in ? nlohmann::json::parse(in) : nlohmann::json();
}

// Bitwise equality (so -0 != +0 and NaN payloads count), with the first difference on failure.
::testing::AssertionResult SameBits(const torch::Tensor& got, const torch::Tensor& want) {
  if (got.scalar_type() != want.scalar_type() || got.numel() != want.numel()) {
    return ::testing::AssertionFailure() << "got " << got.scalar_type() << " x" << got.numel()
                                         << ", want " << want.scalar_type() << " x" << want.numel();
  }
  const torch::Tensor a = got.contiguous().view(-1).view(torch::kUInt8);
  const torch::Tensor b = want.contiguous().view(-1).view(torch::kUInt8);
  if (torch::equal(a, b)) return ::testing::AssertionSuccess();
  const int64_t esize = static_cast<int64_t>(got.element_size());
  const int64_t first = (a != b).nonzero()[0].item<int64_t>() / esize;
  const int64_t count = (a != b).view({-1, esize}).any(1).sum().item<int64_t>();
  return ::testing::AssertionFailure()
         << count << " of " << got.numel() << " elements differ; first at " << first << ": got "
         << got.reshape(-1)[first].item<double>() << ", want "
         << want.reshape(-1)[first].item<double>();
}

TEST(Nf4Parity, SignedDynamicMapEqualsBitsandbytes) {
  const auto t = Load("cases.safetensors");
  const auto cases = LoadJson("cases.json");
  ASSERT_FALSE(cases.empty());
  const std::string name = cases[0]["name"];
  EXPECT_TRUE(SameBits(torch::from_blob(const_cast<float*>(kernels::kDynamicMapSigned), {256}),
                       t.at(name + ".code2")));
}

TEST(Nf4Parity, QuantizeEqualsBitsandbytesByteForByte) {
  const auto t = Load("cases.safetensors");
  const auto cases = LoadJson("cases.json");
  ASSERT_GE(cases.size(), 6u);
  for (const auto& c : cases) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    auto q = Nf4Tensor::Quantize(t.at(name + ".weight"));
    ASSERT_TRUE(q.ok()) << q.status();
    EXPECT_TRUE(SameBits(q->packed, t.at(name + ".packed"))) << "packed weight";
    EXPECT_TRUE(SameBits(q->qabsmax, t.at(name + ".absmax"))) << "quantized absmax";
    EXPECT_TRUE(SameBits(q->absmax2, t.at(name + ".absmax2"))) << "state2.absmax";
    EXPECT_TRUE(SameBits(q->code2, t.at(name + ".code2"))) << "state2.code";
    EXPECT_TRUE(SameBits(torch::tensor({q->offset}), t.at(name + ".offset"))) << "offset";
  }
}

TEST(Nf4Parity, DequantizeEqualsBitsandbytesExactly) {
  const auto t = Load("cases.safetensors");
  const auto cases = LoadJson("cases.json");
  for (const auto& c : cases) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    const torch::Tensor w = t.at(name + ".weight");
    auto q = Nf4Tensor::Quantize(w);
    ASSERT_TRUE(q.ok()) << q.status();
    EXPECT_TRUE(SameBits(q->Dequantize(torch::kFloat), t.at(name + ".dequant_f32"))) << "fp32";
    EXPECT_TRUE(SameBits(q->Dequantize(w.scalar_type()), t.at(name + ".dequant")))
        << c["dtype"].get<std::string>();
  }
}

TEST(Nf4Parity, TransformersCheckpointLoadsToBitsandbytesWeight) {
  const auto meta = LoadJson("checkpoint.json");
  ASSERT_TRUE(meta.is_object());
  const auto parts = Load("checkpoint.safetensors");
  for (const auto& key : meta["keys"]) EXPECT_EQ(parts.count(key.get<std::string>()), 1u) << key;
  auto w = Nf4Tensor::FromBitsandbytes(parts, meta["name"]);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->dtype, torch::kBFloat16);
  const auto ref = Load("checkpoint_dequant.safetensors");
  const torch::Tensor want = ref.at("dequant");
  EXPECT_EQ(w->Dequantize(torch::kBFloat16).sizes(), want.sizes());
  EXPECT_TRUE(SameBits(w->Dequantize(torch::kBFloat16), want));
  // Quantizing the original weight here gives the very bytes bitsandbytes saved.
  auto mine = Nf4Tensor::Quantize(ref.at("weight"));
  ASSERT_TRUE(mine.ok()) << mine.status();
  EXPECT_TRUE(SameBits(mine->packed, w->packed));
  EXPECT_TRUE(SameBits(mine->qabsmax, w->qabsmax));
  EXPECT_TRUE(SameBits(mine->absmax2, w->absmax2));
  EXPECT_EQ(mine->offset, w->offset);
}

}  // namespace
}  // namespace lorad::engine
