// Nf4Tensor on the CPU: quantize/dequantize against the format, Linear against a plain matmul,
// and the checkpoint reader's handling of complete, partial and inconsistent parts. Parity with
// bitsandbytes' bytes is in tests/parity/nf4_parity_test.cpp; the CUDA paths in tests/gpu.
#include "engine/model/nf4_tensor.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>

#include "kernels/dynamic_quant8.h"
#include "kernels/nf4.h"

namespace lorad::engine {
namespace {

torch::Tensor RandomWeight(int64_t out, int64_t in, int seed) {
  torch::manual_seed(seed);
  return 0.02 * torch::randn({out, in});
}

TEST(Nf4Tensor, QuantizeSizesAndBytesFollowTheLayout) {
  // 40 x 100 = 4000 values: 63 blocks (the last short), one second-level block.
  auto t = Nf4Tensor::Quantize(RandomWeight(40, 100, 1));
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->shape, (std::vector<int64_t>{40, 100}));
  EXPECT_EQ(t->dtype, torch::kFloat);
  EXPECT_EQ(t->packed.numel(), 2000);
  EXPECT_EQ(t->qabsmax.numel(), 63);
  EXPECT_EQ(t->absmax2.numel(), 1);
  EXPECT_EQ(t->code2.numel(), 256);
  EXPECT_EQ(t->bytes(), 2000 + 63 + 4 + 1024);
  // 4.5 bits per weight plus the fixed code book: far below fp32's 32.
  auto big = Nf4Tensor::Quantize(RandomWeight(256, 512, 2));
  ASSERT_TRUE(big.ok());
  EXPECT_LT(big->bytes() * 8.0 / big->numel(), 4.6);
}

TEST(Nf4Tensor, DequantizeErrorIsWithinHalfAnNf4Gap) {
  const torch::Tensor w = RandomWeight(64, 192, 3);
  auto t = Nf4Tensor::Quantize(w);
  ASSERT_TRUE(t.ok());
  const torch::Tensor back = t->Dequantize(torch::kFloat);
  ASSERT_EQ(back.sizes(), w.sizes());
  // Widest NF4 gap is 0.3038 of the absmax; the 8-bit absmax adds well under 1%.
  const torch::Tensor absmax = w.abs().view({-1, 64}).amax(1, true);
  const torch::Tensor err = (back - w).abs().view({-1, 64});
  EXPECT_TRUE(torch::all(err <= 0.16 * absmax * 1.01 + 1e-7).item<bool>());
  EXPECT_LT((back - w).norm().item<double>() / w.norm().item<double>(), 0.12);
}

TEST(Nf4Tensor, AbsmaxIsRebuiltFromItsEightBitCodes) {
  const torch::Tensor w = RandomWeight(16, 256, 4);
  auto t = Nf4Tensor::Quantize(w);
  ASSERT_TRUE(t.ok());
  const torch::Tensor exact = w.abs().view({-1, 64}).amax(1);
  EXPECT_TRUE(torch::allclose(t->Absmax(), exact, /*rtol=*/0.02, /*atol=*/1e-6));
  EXPECT_NEAR(t->offset, exact.mean().item<float>(), 1e-7);
}

TEST(Nf4Tensor, HalfPrecisionInputsQuantizeLikeTheirFp32Values) {
  const torch::Tensor w = RandomWeight(8, 128, 5);
  for (auto dtype : {torch::kBFloat16, torch::kHalf}) {
    const torch::Tensor wl = w.to(dtype);
    auto low = Nf4Tensor::Quantize(wl);
    auto ref = Nf4Tensor::Quantize(wl.to(torch::kFloat));
    ASSERT_TRUE(low.ok() && ref.ok());
    EXPECT_EQ(low->dtype, dtype);
    EXPECT_TRUE(torch::equal(low->packed, ref->packed));
    EXPECT_TRUE(torch::equal(low->qabsmax, ref->qabsmax));
    EXPECT_TRUE(torch::equal(low->absmax2, ref->absmax2));
    EXPECT_EQ(low->offset, ref->offset);
    EXPECT_EQ(low->Dequantize(dtype).scalar_type(), dtype);
  }
}

TEST(Nf4Tensor, QuantizeRejectsWhatItCannotHold) {
  EXPECT_FALSE(Nf4Tensor::Quantize(torch::Tensor()).ok());
  auto ints = Nf4Tensor::Quantize(torch::ones({4, 64}, torch::kInt32));
  ASSERT_FALSE(ints.ok());
  EXPECT_NE(ints.status().message().find("Int"), std::string::npos) << ints.status();
  EXPECT_FALSE(Nf4Tensor::Quantize(torch::ones({64})).ok());
  EXPECT_FALSE(Nf4Tensor::Quantize(torch::ones({2, 2, 64})).ok());
  EXPECT_FALSE(Nf4Tensor::Quantize(torch::ones({0, 64})).ok());
}

TEST(Nf4Tensor, LinearEqualsMatmulWithTheDequantizedWeight) {
  auto t = Nf4Tensor::Quantize(RandomWeight(48, 128, 6));
  ASSERT_TRUE(t.ok());
  const torch::Tensor x = torch::randn({2, 3, 128});
  const torch::Tensor y = t->Linear(x);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 3, 48}));
  EXPECT_TRUE(torch::allclose(y, torch::matmul(x, t->Dequantize(torch::kFloat).t())));
}

TEST(Nf4Tensor, LinearPassesGradientsToItsInput) {
  auto t = Nf4Tensor::Quantize(RandomWeight(8, 64, 7));
  ASSERT_TRUE(t.ok());
  const torch::Tensor x = torch::randn({1, 64}, torch::requires_grad());
  t->Linear(x).sum().backward();
  ASSERT_TRUE(x.grad().defined());
  EXPECT_TRUE(torch::allclose(x.grad()[0], t->Dequantize(torch::kFloat).sum(0)));
}

TEST(Nf4Tensor, LinearWithTheWrongInnerSizeThrowsATorchError) {
  auto t = Nf4Tensor::Quantize(RandomWeight(8, 64, 8));
  ASSERT_TRUE(t.ok());
  EXPECT_THROW(t->Linear(torch::randn({1, 65})), c10::Error);
}

// The state-dict layout transformers writes for a bitsandbytes Linear4bit weight, built from a
// quantized tensor: the reader must give back the same tensor.
std::map<std::string, torch::Tensor> AsBitsandbytesParts(const Nf4Tensor& t,
                                                         const std::string& name) {
  char offset[32];
  std::snprintf(offset, sizeof(offset), "%.9g", static_cast<double>(t.offset));  // round-trips
  std::string json =
      "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", "
      "\"shape\": [" +
      std::to_string(t.shape[0]) + ", " + std::to_string(t.shape[1]) +
      "], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", "
      "\"nested_offset\": " +
      offset + "}";
  torch::Tensor state = torch::empty({static_cast<int64_t>(json.size())}, torch::kUInt8);
  std::memcpy(state.data_ptr(), json.data(), json.size());
  return {
      {name, t.packed.view({-1, 1})},
      {name + ".absmax", t.qabsmax},
      {name + ".quant_map",
       torch::tensor(std::vector<float>(kernels::kNf4Code, kernels::kNf4Code + 16))},
      {name + ".nested_absmax", t.absmax2},
      {name + ".nested_quant_map", t.code2},
      {name + ".quant_state.bitsandbytes__nf4", state},
  };
}

TEST(Nf4Tensor, FromBitsandbytesReadsTheStateDictLayout) {
  auto t = Nf4Tensor::Quantize(RandomWeight(24, 192, 9));
  ASSERT_TRUE(t.ok());
  const std::string name = "model.layers.0.mlp.up_proj.weight";
  auto back = Nf4Tensor::FromBitsandbytes(AsBitsandbytesParts(*t, name), name);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->shape, t->shape);
  EXPECT_EQ(back->dtype, torch::kBFloat16);
  EXPECT_TRUE(torch::equal(back->Dequantize(torch::kFloat), t->Dequantize(torch::kFloat)));
}

TEST(Nf4Tensor, FromBitsandbytesNamesWhatIsMissingOrInconsistent) {
  auto t = Nf4Tensor::Quantize(RandomWeight(8, 128, 10));
  ASSERT_TRUE(t.ok());
  const std::string name = "q_proj.weight";
  auto expect_error = [&](std::map<std::string, torch::Tensor> parts, absl::StatusCode code,
                          const std::string& needle) {
    auto r = Nf4Tensor::FromBitsandbytes(parts, name);
    ASSERT_FALSE(r.ok()) << needle;
    EXPECT_EQ(r.status().code(), code) << r.status();
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
  };
  const auto good = AsBitsandbytesParts(*t, name);
  for (const char* suffix : {"", ".absmax", ".quant_map", ".nested_quant_map"}) {
    auto parts = good;
    parts.erase(name + suffix);
    expect_error(parts, absl::StatusCode::kNotFound, name + suffix);
  }
  {
    auto parts = good;
    parts.erase(name + ".quant_state.bitsandbytes__nf4");
    expect_error(parts, absl::StatusCode::kNotFound, "quant_state");
    parts[name + ".quant_state.bitsandbytes__fp4"] =
        good.at(name + ".quant_state.bitsandbytes__nf4");
    expect_error(parts, absl::StatusCode::kUnimplemented, "FP4");
  }
  {
    auto parts = good;
    parts.erase(name + ".nested_absmax");
    expect_error(parts, absl::StatusCode::kUnimplemented, "double quantization");
  }
  {
    auto parts = good;
    parts[name + ".absmax"] = parts[name + ".absmax"].narrow(0, 0, 3);
    expect_error(parts, absl::StatusCode::kInvalidArgument, "has 3 values, expected 16");
  }
  {
    auto parts = good;
    parts[name] = parts[name].narrow(0, 0, 10);
    expect_error(parts, absl::StatusCode::kInvalidArgument, "holds 10 bytes");
  }
  {
    auto parts = good;
    parts[name + ".quant_map"] = -parts[name + ".quant_map"];
    expect_error(parts, absl::StatusCode::kUnimplemented, "code book");
  }
  auto with_state = [&](const std::string& json) {
    auto parts = good;
    torch::Tensor s = torch::empty({static_cast<int64_t>(json.size())}, torch::kUInt8);
    std::memcpy(s.data_ptr(), json.data(), json.size());
    parts[name + ".quant_state.bitsandbytes__nf4"] = s;
    return parts;
  };
  expect_error(with_state("{not json"), absl::StatusCode::kInvalidArgument, "not a JSON object");
  expect_error(with_state("{\"quant_type\": \"nf4\", \"blocksize\": 128, \"shape\": [8, 128]}"),
               absl::StatusCode::kUnimplemented, "blocksize 128");
  expect_error(with_state("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"shape\": [8]}"),
               absl::StatusCode::kInvalidArgument, "shape");
  expect_error(with_state("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"shape\": [8, 128], "
                          "\"dtype\": \"int8\"}"),
               absl::StatusCode::kInvalidArgument, "int8");
  // Fields of the wrong type are errors naming them, not exceptions.
  expect_error(with_state("{\"quant_type\": 5}"), absl::StatusCode::kInvalidArgument,
               "field 'quant_type'");
  const std::string head = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"shape\": [8, 128], ";
  expect_error(with_state(head + "\"dtype\": 16}"), absl::StatusCode::kInvalidArgument, "dtype");
  expect_error(with_state(head + "\"dtype\": \"bfloat16\", \"nested_offset\": 0.5, "
                                 "\"nested_blocksize\": \"256\"}"),
               absl::StatusCode::kInvalidArgument, "field 'nested_blocksize'");
  expect_error(with_state(head + "\"dtype\": \"bfloat16\", \"nested_offset\": 0.5, "
                                 "\"nested_blocksize\": 256, \"nested_dtype\": 32}"),
               absl::StatusCode::kInvalidArgument, "field 'nested_dtype'");
}

TEST(Nf4Tensor, ToKeepsTheValues) {
  auto t = Nf4Tensor::Quantize(RandomWeight(4, 64, 11));
  ASSERT_TRUE(t.ok());
  const Nf4Tensor copy = t->To(torch::kCPU);
  EXPECT_TRUE(torch::equal(copy.Dequantize(torch::kFloat), t->Dequantize(torch::kFloat)));
}

}  // namespace
}  // namespace lorad::engine
