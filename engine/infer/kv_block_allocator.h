// KvBlockAllocator: the bookkeeping of the paged KV cache. The cache itself is a pool of
// `num_blocks` fixed-size blocks (block_size tokens each, every layer's K and V); this class only
// decides which block ids a sequence owns, in order (its block table). torch-free, so the
// scheduler's tests run without a device.
//
// Thread rules: used by the GPU loop thread only.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"

namespace lorad::engine {

using SequenceId = int64_t;

class KvBlockAllocator {
 public:
  KvBlockAllocator(int32_t num_blocks, int32_t block_size);

  int32_t block_size() const { return block_size_; }
  int32_t num_blocks() const { return num_blocks_; }
  int32_t free_blocks() const { return static_cast<int32_t>(free_.size()); }
  // Blocks needed to hold `tokens` tokens.
  int32_t BlocksFor(int64_t tokens) const;
  // Extra blocks `seq` needs to hold `tokens` tokens in total (0 if it has enough).
  int32_t ExtraBlocksFor(SequenceId seq, int64_t tokens) const;

  // Grows `seq`'s block table to hold `tokens` tokens. RESOURCE_EXHAUSTED (nothing changed)
  // when the pool has too few free blocks.
  absl::Status Reserve(SequenceId seq, int64_t tokens);
  // Returns every block of `seq` to the pool (no-op for an unknown sequence).
  void Release(SequenceId seq);

  // The block ids holding `seq`'s tokens, in order; empty for an unknown sequence.
  const std::vector<int32_t>& BlockTable(SequenceId seq) const;
  // Fraction of blocks in use, for the kv-cache usage metric.
  double Usage() const;

 private:
  int32_t num_blocks_;
  int32_t block_size_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
  std::unordered_map<SequenceId, std::vector<int32_t>> tables_;
};

}  // namespace lorad::engine
