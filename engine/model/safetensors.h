// Safetensors: the Hugging Face tensor file format, read memory-mapped and written atomically.
//
// Format: 8-byte little-endian header length N, N bytes of JSON
//   {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}}
// then the data section; offsets are relative to the data section start.
//
// The reader validates the header before trusting it: header length within the file, JSON
// well-formed, dtype known, shape x dtype size == byte range, ranges inside the data section and
// not overlapping. A truncated or hostile file is an error naming the file and the tensor, never a
// crash or an out-of-bounds read. torch-free: the model loader wraps views with torch::from_blob.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lorad::engine {

enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

// "F32" -> kF32 etc.; unknown names are an error.
absl::StatusOr<DType> DTypeFromName(const std::string& name);
const char* DTypeName(DType dtype);
size_t DTypeSize(DType dtype);

// A tensor inside a mapped file (or, for writing, inside caller-owned memory).
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // valid while the SafetensorsFile (or the caller's buffer) lives
  size_t nbytes = 0;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Maps and validates the whole header. Errors name `path`.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Tensor names in file order.
  std::vector<std::string> names() const;
  // nullptr when absent.
  const TensorView* Find(const std::string& name) const;
  const std::vector<TensorView>& tensors() const { return tensors_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;  // mmap base
  size_t map_size_ = 0;
  std::map<std::string, std::string> metadata_;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t> index_;
};

// Writes tensors (in the given order) to `path` atomically: temp file in the same folder, fsync,
// rename. Names must be unique and non-empty; nbytes must equal numel x dtype size.
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorView>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace lorad::engine
