// SafetensorsFile and WriteSafetensors against the Python safetensors library: a file Python wrote
// (every dtype, an empty tensor, a scalar, metadata) reads back with Python's values, and a file
// lorad writes from it loads in Python with identical tensors (tests/parity/test_safetensors.py
// runs RewritesPythonFile with LORAD_SAFETENSORS_OUT set and checks that side).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "engine/model/safetensors.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

namespace fs = std::filesystem;

std::string ReferenceDir() { return std::string(std::getenv("LORAD_PARITY_DIR")) + "/safetensors"; }

torch::ScalarType TorchType(DType d) {
  switch (d) {
    case DType::kF64:
      return torch::kFloat64;
    case DType::kF32:
      return torch::kFloat32;
    case DType::kF16:
      return torch::kFloat16;
    case DType::kBF16:
      return torch::kBFloat16;
    case DType::kI64:
      return torch::kInt64;
    case DType::kI32:
      return torch::kInt32;
    case DType::kI16:
      return torch::kInt16;
    case DType::kI8:
      return torch::kInt8;
    case DType::kU8:
      return torch::kUInt8;
    case DType::kBool:
      return torch::kBool;
  }
  return torch::kFloat32;
}

torch::Tensor ToTorch(const TensorView& v) {
  torch::Tensor t = torch::empty(v.shape, torch::TensorOptions().dtype(TorchType(v.dtype)));
  if (v.nbytes > 0) std::memcpy(t.data_ptr(), v.data, v.nbytes);
  return t;
}

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in) << "missing reference " << path;
  return nlohmann::json::parse(in);
}

TEST(SafetensorsParity, ReadsEveryDtypePythonWrote) {
  const auto ref = ReadJson(ReferenceDir() + "/all_dtypes.json");
  auto file = SafetensorsFile::Open(ReferenceDir() + "/all_dtypes.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  using Metadata = std::map<std::string, std::string>;
  EXPECT_EQ((*file)->metadata(), ref["metadata"].get<Metadata>());
  ASSERT_EQ((*file)->tensors().size(), ref["tensors"].size());
  for (const auto& [name, want] : ref["tensors"].items()) {
    SCOPED_TRACE(name);
    const TensorView* view = (*file)->Find(name);
    ASSERT_NE(view, nullptr);
    EXPECT_STREQ(DTypeName(view->dtype), want["dtype"].get<std::string>().c_str());
    EXPECT_EQ(view->shape, want["shape"].get<std::vector<int64_t>>());
    // Python wrote every float as float64 and every integer as int64: both exact.
    torch::Tensor got = ToTorch(*view).flatten();
    if (got.is_floating_point()) {
      const auto values = want["values"].get<std::vector<double>>();
      EXPECT_TRUE(torch::equal(got.to(torch::kFloat64),
                               torch::tensor(values, torch::kFloat64).reshape({-1})));
    } else {
      std::vector<int64_t> values;
      for (const auto& v : want["values"])
        values.push_back(v.is_boolean() ? v.get<bool>() : v.get<int64_t>());
      EXPECT_TRUE(
          torch::equal(got.to(torch::kInt64), torch::tensor(values, torch::kInt64).reshape({-1})));
    }
  }
}

TEST(SafetensorsParity, RewritesPythonFile) {
  const char* out_env = std::getenv("LORAD_SAFETENSORS_OUT");
  const fs::path out = out_env != nullptr ? fs::path(out_env)
                                          : fs::path(::testing::TempDir()) / "safetensors_parity";
  fs::create_directories(out);
  auto python = SafetensorsFile::Open(ReferenceDir() + "/all_dtypes.safetensors");
  ASSERT_TRUE(python.ok()) << python.status();
  const std::string path = (out / "all_dtypes.safetensors").string();
  ASSERT_TRUE(WriteSafetensors(path, (*python)->tensors(), (*python)->metadata()).ok());

  auto ours = SafetensorsFile::Open(path);
  ASSERT_TRUE(ours.ok()) << ours.status();
  EXPECT_EQ((*ours)->metadata(), (*python)->metadata());
  ASSERT_EQ((*ours)->tensors().size(), (*python)->tensors().size());
  for (const auto& want : (*python)->tensors()) {
    const TensorView* got = (*ours)->Find(want.name);
    ASSERT_NE(got, nullptr) << want.name;
    EXPECT_EQ(got->dtype, want.dtype) << want.name;
    EXPECT_EQ(got->shape, want.shape) << want.name;
    ASSERT_EQ(got->nbytes, want.nbytes) << want.name;
    EXPECT_EQ(std::memcmp(got->data, want.data, want.nbytes), 0) << want.name;
  }
}

}  // namespace
}  // namespace lorad::engine
