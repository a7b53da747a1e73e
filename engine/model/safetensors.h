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
#include <functional>
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
  // Valid while the SafetensorsFile (or the caller's buffer) lives. Aligned for the dtype when the
  // header is padded to 8 bytes, as every writer does; a hostile file may not be: copy, don't cast.
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // How the file's bytes are held: kMap maps the file (zero-copy, for base models, whose files
  // the operator owns); kRead reads it into memory, for files others may rewrite meanwhile
  // (adapters): a mapped file that shrinks kills the process with SIGBUS on the next access.
  enum class Access { kMap, kRead };
  // Maps (or reads) the file and validates the whole header. Errors name `path`.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path,
                                                               Access access = Access::kMap);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Tensor names in file (data offset) order.
  std::vector<std::string> names() const;
  // nullptr when absent.
  const TensorView* Find(const std::string& name) const;
  const std::vector<TensorView>& tensors() const { return tensors_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;  // mmap base (kMap)
  size_t map_size_ = 0;
  std::vector<uint8_t> bytes_;  // the file (kRead)
  std::map<std::string, std::string> metadata_;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t> index_;
};

// Writes tensors to `path` atomically: temp file in the same folder, fsync, rename, fsync the
// folder. Names must be unique, non-empty UTF-8; nbytes must equal numel x dtype size. Like the
// Python library, the header is padded to 8 bytes and data is laid out largest dtype first
// (stable otherwise), so every tensor is aligned for its dtype when the file is mapped.
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorView>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// The same file, with each tensor's bytes made only when the writer reaches it, so a file larger
// than memory can be written (a merged model): `tensors` give names, dtypes, shapes and nbytes
// (their data is not read); `produce` is called once per tensor, in file order, and hands the
// bytes to `write`, in as many pieces as it likes. Its non-OK status (or exception), a `write`
// error, or a count of bytes other than nbytes abandons the file (nothing is left at `path` or
// beside it).
using TensorBytesSink = std::function<absl::Status(const uint8_t* bytes, size_t n)>;
using TensorBytesProducer =
    std::function<absl::Status(const TensorView& tensor, const TensorBytesSink& write)>;
absl::Status WriteSafetensorsStreaming(const std::string& path,
                                       const std::vector<TensorView>& tensors,
                                       const std::map<std::string, std::string>& metadata,
                                       const TensorBytesProducer& produce);

}  // namespace lorad::engine
