#include "engine/infer/kv_block_allocator.h"

#include "absl/strings/str_cat.h"

namespace lorad::engine {

KvBlockAllocator::KvBlockAllocator(int32_t num_blocks, int32_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  free_.reserve(num_blocks);
  // Pop from the back: hand out block 0 first, which keeps early tables easy to read in tests.
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

int32_t KvBlockAllocator::BlocksFor(int64_t tokens) const {
  return static_cast<int32_t>((tokens + block_size_ - 1) / block_size_);
}

int32_t KvBlockAllocator::ExtraBlocksFor(SequenceId seq, int64_t tokens) const {
  const int32_t have = static_cast<int32_t>(BlockTable(seq).size());
  const int32_t need = BlocksFor(tokens);
  return need > have ? need - have : 0;
}

absl::Status KvBlockAllocator::Reserve(SequenceId seq, int64_t tokens) {
  const int32_t extra = ExtraBlocksFor(seq, tokens);
  if (extra > free_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache: ", extra, " blocks needed, ",
                                                     free_blocks(), " free of ", num_blocks_));
  }
  auto& table = tables_[seq];
  for (int32_t i = 0; i < extra; ++i) {
    table.push_back(free_.back());
    free_.pop_back();
  }
  return absl::OkStatus();
}

void KvBlockAllocator::Release(SequenceId seq) {
  auto it = tables_.find(seq);
  if (it == tables_.end()) return;
  for (auto b = it->second.rbegin(); b != it->second.rend(); ++b) free_.push_back(*b);
  tables_.erase(it);
}

const std::vector<int32_t>& KvBlockAllocator::BlockTable(SequenceId seq) const {
  static const std::vector<int32_t> kEmpty;
  auto it = tables_.find(seq);
  return it == tables_.end() ? kEmpty : it->second;
}

double KvBlockAllocator::Usage() const {
  return num_blocks_ == 0 ? 0.0 : 1.0 - static_cast<double>(free_blocks()) / num_blocks_;
}

}  // namespace lorad::engine
