#include "engine/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <filesystem>
#include <limits>
#include <optional>
#include <set>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/json_file.h"
#include "engine/runtime/durable_file.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

using nlohmann::json;
using nlohmann::ordered_json;

// The header length is read as a little-endian u64 and tensors are viewed in place.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors is little-endian");

constexpr size_t kHeaderLengthBytes = 8;
// Real checkpoints have headers of a few MB (one entry per tensor); the Python library caps them
// at 100 MB too. Anything larger is a corrupt or hostile length, not a model.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr const char* kMetadataKey = "__metadata__";

struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::kF64, "F64", 8},   {DType::kF32, "F32", 4}, {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2}, {DType::kI64, "I64", 8}, {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},   {DType::kI8, "I8", 1},   {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},
};

std::string KnownDTypeNames() {
  std::vector<std::string> names;
  for (const auto& d : kDTypes) names.push_back(d.name);
  return absl::StrJoin(names, ", ");
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string ErrnoText() { return std::strerror(errno); }

// numel x elem_size, or nullopt when the product does not fit in size_t / int64.
std::optional<size_t> CheckedBytes(const std::vector<int64_t>& shape, size_t elem_size) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
    if (d != 0 && n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / d) {
      return std::nullopt;
    }
    n *= static_cast<uint64_t>(d);
  }
  if (n != 0 && n > std::numeric_limits<size_t>::max() / elem_size) return std::nullopt;
  return static_cast<size_t>(n * elem_size);
}

// Parses one tensor entry of the header. `data_size` is the data section's length.
absl::StatusOr<TensorView> ParseEntry(const std::string& where, const std::string& name,
                                      const json& entry, const uint8_t* data, size_t data_size) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", name, "': ", what));
  };
  if (!entry.is_object()) return bad("header entry is not an object");
  TensorView view;
  view.name = name;

  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string()) return bad("'dtype' missing");
  auto dtype = DTypeFromName(dtype_it->get<std::string>());
  if (!dtype.ok()) return bad(std::string(dtype.status().message()));
  view.dtype = *dtype;

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array()) return bad("'shape' missing");
  for (const auto& d : *shape_it) {
    // is_number_unsigned: nlohmann stores non-negative integer literals as unsigned.
    if (!d.is_number_integer() || !d.is_number_unsigned()) {
      return bad(absl::StrCat("shape ", shape_it->dump(), " must hold non-negative integers"));
    }
    const uint64_t v = d.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return bad(absl::StrCat("shape ", shape_it->dump(), " is too large"));
    }
    view.shape.push_back(static_cast<int64_t>(v));
  }
  auto nbytes = CheckedBytes(view.shape, DTypeSize(view.dtype));
  if (!nbytes) {
    return bad(absl::StrCat("shape ", ShapeString(view.shape), " overflows the byte count"));
  }

  auto off_it = entry.find("data_offsets");
  if (off_it == entry.end() || !off_it->is_array() || off_it->size() != 2 ||
      !(*off_it)[0].is_number_unsigned() || !(*off_it)[1].is_number_unsigned()) {
    return bad("'data_offsets' must be [begin, end] with non-negative integers");
  }
  const uint64_t begin = (*off_it)[0].get<uint64_t>();
  const uint64_t end = (*off_it)[1].get<uint64_t>();
  if (begin > end) {
    return bad(absl::StrCat("data_offsets [", begin, ", ", end, "] end before they begin"));
  }
  if (end > data_size) {
    return bad(absl::StrCat("data_offsets [", begin, ", ", end,
                            "] run past the end of the data section (", data_size,
                            " bytes): the file is truncated or corrupt"));
  }
  if (end - begin != *nbytes) {
    return bad(absl::StrCat("data_offsets [", begin, ", ", end, "] hold ", end - begin,
                            " bytes but shape ", ShapeString(view.shape), " of ",
                            DTypeName(view.dtype), " needs ", *nbytes));
  }
  view.data = data + begin;
  view.nbytes = *nbytes;
  return view;
}

// Writes all of `bytes` to `fd`, retrying short writes and EINTR.
bool WriteAll(int fd, const uint8_t* bytes, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, bytes, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    bytes += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

}  // namespace

absl::StatusOr<DType> DTypeFromName(const std::string& name) {
  for (const auto& d : kDTypes) {
    if (name == d.name) return d.dtype;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype '", name, "' (known: ", KnownDTypeNames(), ")"));
}

const char* DTypeName(DType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.name;
  }
  return "?";
}

size_t DTypeSize(DType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.size;
  }
  return 1;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path,
                                                                       Access access) {
  // Not waiting on a FIFO in the file's place, and refusing anything but a regular file.
  int64_t file_size = 0;
  auto opened = OpenRegularFile(path, path, &file_size);
  if (!opened.ok()) return opened.status();
  const int fd = *opened;
  const size_t size = static_cast<size_t>(file_size);
  if (size < kHeaderLengthBytes) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": file is ", size,
                     " bytes, too short for a safetensors header (truncated or not safetensors)"));
  }
  // From here the destructor unmaps, on success and on every error path.
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  const uint8_t* base = nullptr;
  if (access == Access::kRead) {
    file->bytes_.resize(size);
    size_t done = 0;
    while (done < size) {
      const ssize_t n =
          ::pread(fd, file->bytes_.data() + done, size - done, static_cast<off_t>(done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const std::string err = n < 0 ? ErrnoText() : "the file got shorter while being read";
        ::close(fd);
        return absl::UnavailableError(absl::StrCat("cannot read ", path, ": ", err));
      }
      done += static_cast<size_t>(n);
    }
    ::close(fd);
    base = file->bytes_.data();
  } else {
    void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const std::string map_err = ErrnoText();
    ::close(fd);  // the mapping keeps the file alive
    if (map == MAP_FAILED) {
      return absl::InternalError(absl::StrCat("cannot mmap ", path, ": ", map_err));
    }
    file->map_ = map;
    file->map_size_ = size;
    base = static_cast<const uint8_t*>(map);
  }

  uint64_t header_len = 0;
  std::memcpy(&header_len, base, sizeof(header_len));
  // `git clone` without git-lfs leaves a small text pointer in the weights' place.
  constexpr std::string_view kLfsPointer = "version https://git-lfs";
  if (size >= kLfsPointer.size() &&
      std::string_view(reinterpret_cast<const char*>(base), kLfsPointer.size()) == kLfsPointer) {
    return absl::InvalidArgumentError(
        absl::StrCat(path,
                     " is a git-lfs pointer, not the weights (the repository was cloned without "
                     "git-lfs): run `git lfs pull` in the folder, or download it again with the "
                     "Hugging Face CLI (`hf download`)"));
  }
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_len,
                                                   " bytes exceeds the limit of ", kMaxHeaderBytes,
                                                   " (corrupt or not a safetensors file)"));
  }
  if (header_len > size - kHeaderLengthBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header length ", header_len, " bytes runs past the end of the file (",
                     size, " bytes): the file is truncated or not safetensors"));
  }
  const char* header = reinterpret_cast<const char*>(base + kHeaderLengthBytes);
  const uint8_t* data = base + kHeaderLengthBytes + header_len;
  const size_t data_size = size - kHeaderLengthBytes - header_len;

  // The callback sees every top-level key, so duplicates (which a JSON object would silently
  // collapse to the last one) are caught. A sorted object, not an insertion-ordered one: its
  // inserts are linear, so a hostile header of millions of entries took hours (the tensors are
  // put in data order below anyway).
  std::set<std::string> seen;
  std::string duplicate;
  auto on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key && duplicate.empty()) {
      const std::string key = parsed.get<std::string>();
      if (!seen.insert(key).second) duplicate = key;
    }
    return true;
  };
  if (auto s = CheckJsonNesting(std::string_view(header, header_len), path + ": header"); !s.ok()) {
    return s;
  }
  json j = json::parse(header, header + header_len, on_event, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header (", header_len, " bytes) is not a JSON object"));
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": tensor '", duplicate, "' appears twice in the header"));
  }

  for (const auto& [name, entry] : j.items()) {
    if (name == kMetadataKey) {
      if (entry.is_null()) continue;
      if (!entry.is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": __metadata__ must be an object of strings"));
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": __metadata__ '", key, "' is not a string"));
        }
        file->metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    auto view = ParseEntry(path, name, entry, data, data_size);
    if (!view.ok()) return view.status();
    file->tensors_.push_back(std::move(*view));
  }

  // File order is data order. Sorting by (begin, end) puts each range after all that start
  // earlier, so one pass against the furthest end seen finds every overlap.
  std::stable_sort(file->tensors_.begin(), file->tensors_.end(),
                   [](const TensorView& a, const TensorView& b) {
                     return a.data != b.data ? a.data < b.data : a.nbytes < b.nbytes;
                   });
  const TensorView* furthest = nullptr;
  for (const auto& t : file->tensors_) {
    if (furthest != nullptr && t.data < furthest->data + furthest->nbytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensors '", furthest->name, "' and '", t.name,
                       "' overlap in the data section (bytes ", furthest->data - data, "-",
                       furthest->data - data + furthest->nbytes, " and ", t.data - data, "-",
                       t.data - data + t.nbytes, ")"));
    }
    if (furthest == nullptr || t.data + t.nbytes >= furthest->data + furthest->nbytes) {
      furthest = &t;
    }
  }
  for (size_t i = 0; i < file->tensors_.size(); ++i) file->index_[file->tensors_[i].name] = i;
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> names;
  names.reserve(tensors_.size());
  for (const auto& t : tensors_) names.push_back(t.name);
  return names;
}

const TensorView* SafetensorsFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::Status WriteSafetensorsStreaming(const std::string& path,
                                       const std::vector<TensorView>& tensors,
                                       const std::map<std::string, std::string>& metadata,
                                       const TensorBytesProducer& produce) {
  std::set<std::string> names;
  for (const auto& t : tensors) {
    const std::string where = absl::StrCat(path, ": tensor '", t.name, "'");
    if (t.name.empty())
      return absl::InvalidArgumentError(absl::StrCat(path, ": empty tensor name"));
    if (t.name == kMetadataKey) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": the name is reserved"));
    }
    if (!names.insert(t.name).second) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": the name appears twice"));
    }
    auto nbytes = CheckedBytes(t.shape, DTypeSize(t.dtype));
    if (!nbytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": invalid shape ", ShapeString(t.shape)));
    }
    if (*nbytes != t.nbytes) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": shape ", ShapeString(t.shape),
                                                     " of ", DTypeName(t.dtype), " needs ", *nbytes,
                                                     " bytes, got ", t.nbytes));
    }
  }

  // Like the Python library, lay data out largest element first: the data section starts
  // 8-aligned and every size is a power of two, so every tensor is aligned for its dtype.
  std::vector<const TensorView*> order;
  for (const auto& t : tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const TensorView* a, const TensorView* b) {
    return DTypeSize(a->dtype) > DTypeSize(b->dtype);
  });

  ordered_json header = ordered_json::object();
  if (!metadata.empty()) {
    ordered_json meta = ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header[kMetadataKey] = std::move(meta);
  }
  size_t offset = 0;
  for (const TensorView* t : order) {
    header[t->name] = {{"dtype", DTypeName(t->dtype)},
                       {"shape", t->shape},
                       {"data_offsets", {offset, offset + t->nbytes}}};
    offset += t->nbytes;
  }
  std::string header_text;
  try {
    header_text = header.dump();  // throws on names or metadata that are not valid UTF-8
  } catch (const ordered_json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": tensor names and metadata must be valid UTF-8 (", e.what(), ")"));
  }
  // Pad with spaces to a multiple of 8, as the Python library does, so the data stays aligned.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  const uint64_t header_len = header_text.size();

  const std::filesystem::path target(path);
  const std::string folder =
      target.has_parent_path() ? target.parent_path().string() : std::string(".");
  std::string temp = absl::StrCat(path, ".tmp-XXXXXX");
  const int fd = ::mkostemp(temp.data(), O_CLOEXEC);
  if (fd < 0) {
    return absl::InternalError(
        absl::StrCat("cannot create a temporary file beside ", path, ": ", ErrnoText()));
  }
  auto fail = [&](const std::string& what) {
    const std::string err = ErrnoText();
    ::close(fd);
    ::unlink(temp.c_str());
    return absl::InternalError(absl::StrCat("writing ", path, ": ", what, ": ", err));
  };
  uint8_t len_bytes[kHeaderLengthBytes];
  std::memcpy(len_bytes, &header_len, sizeof(len_bytes));
  if (!WriteAll(fd, len_bytes, sizeof(len_bytes)) ||
      !WriteAll(fd, reinterpret_cast<const uint8_t*>(header_text.data()), header_text.size())) {
    return fail("write");
  }
  for (const TensorView* t : order) {
    size_t written = 0;
    const TensorBytesSink write = [&](const uint8_t* bytes, size_t n) {
      if (written + n > t->nbytes) {
        return absl::InternalError(absl::StrCat("writing ", path, ": tensor '", t->name,
                                                "' has more than its ", t->nbytes, " bytes"));
      }
      if (n > 0 && !WriteAll(fd, bytes, n)) {
        return absl::InternalError(absl::StrCat("writing ", path, ": write: ", ErrnoText()));
      }
      written += n;
      return absl::OkStatus();
    };
    absl::Status produced;
    try {  // the producer may throw (torch, bad_alloc): the file is abandoned all the same
      produced = produce(*t, write);
    } catch (const std::exception& e) {
      produced = absl::InternalError(
          absl::StrCat("writing ", path, ": making tensor '", t->name, "': ", e.what()));
    }
    if (produced.ok() && written != t->nbytes) {
      produced =
          absl::InternalError(absl::StrCat("writing ", path, ": tensor '", t->name, "' gave ",
                                           written, " of its ", t->nbytes, " bytes"));
    }
    if (!produced.ok()) {
      ::close(fd);
      ::unlink(temp.c_str());
      return produced;
    }
  }
  if (::fchmod(fd, 0644) != 0) return fail("chmod");
  if (::fsync(fd) != 0) return fail("fsync");
  if (::close(fd) != 0) {
    const std::string err = ErrnoText();
    ::unlink(temp.c_str());
    return absl::InternalError(absl::StrCat("writing ", path, ": close: ", err));
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const std::string err = ErrnoText();
    ::unlink(temp.c_str());
    return absl::InternalError(absl::StrCat("cannot rename ", temp, " to ", path, ": ", err));
  }
  return SyncPath(folder);
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorView>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  for (const auto& t : tensors) {
    if (t.nbytes > 0 && t.data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", t.name, "': no data"));
    }
  }
  return WriteSafetensorsStreaming(
      path, tensors, metadata,
      [](const TensorView& t, const TensorBytesSink& write) { return write(t.data, t.nbytes); });
}

}  // namespace lorad::engine
