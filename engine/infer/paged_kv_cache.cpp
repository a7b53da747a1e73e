#include "engine/infer/paged_kv_cache.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lorad::engine {

PagedKvCache::PagedKvCache(const PagedKvCacheOptions& options) : options_(options) {
  const auto tensor_options = torch::TensorOptions().dtype(options.dtype).device(options.device);
  const int64_t slots = (options.num_blocks + 1) * options.block_size;
  for (int64_t layer = 0; layer < options.num_layers; ++layer) {
    // Zeros, not empty: masked keys still enter the attention product and must be finite.
    keys_.push_back(torch::zeros({slots, options.kv_heads, options.head_dim}, tensor_options));
    values_.push_back(torch::zeros_like(keys_.back()));
  }
}

int64_t PagedKvCache::BytesPerBlock(int64_t num_layers, int64_t block_size, int64_t kv_heads,
                                    int64_t head_dim, torch::ScalarType dtype) {
  return 2 * num_layers * block_size * kv_heads * head_dim *
         static_cast<int64_t>(c10::elementSize(dtype));
}

absl::Status PagedKvCache::CheckRow(size_t b, const PagedRow& row) const {
  const int64_t total = row.cached + row.new_tokens;
  if (row.cached < 0 || row.new_tokens < 1 || total > options_.max_context) {
    return absl::InvalidArgumentError(
        absl::StrCat("paged KV row ", b, ": ", row.cached, " cached + ", row.new_tokens,
                     " new tokens must be >= 1 new and fit the context of ", options_.max_context));
  }
  const int64_t covered = static_cast<int64_t>(row.block_table.size()) * options_.block_size;
  if (covered < total) {
    return absl::InvalidArgumentError(absl::StrCat("paged KV row ", b, ": its ",
                                                   row.block_table.size(), " blocks hold ", covered,
                                                   " tokens, ", total, " needed"));
  }
  for (int32_t block : row.block_table) {
    if (block < 0 || block >= options_.num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat(
          "paged KV row ", b, ": block ", block, " is outside the pool of ", options_.num_blocks));
    }
  }
  return absl::OkStatus();
}

absl::Status PagedKvCache::Bind(std::vector<PagedRow> rows) {
  for (size_t b = 0; b < rows.size(); ++b) {
    if (auto s = CheckRow(b, rows[b]); !s.ok()) return s;
  }
  rows_ = std::move(rows);
  lengths_.clear();
  for (const PagedRow& row : rows_) lengths_.push_back(row.cached);
  return absl::OkStatus();
}

int64_t PagedKvCache::SlotOf(const PagedRow& row, int64_t position) const {
  const int64_t block = position / options_.block_size;
  if (block >= static_cast<int64_t>(row.block_table.size())) return scratch_slot();
  return row.block_table[block] * options_.block_size + position % options_.block_size;
}

void PagedKvCache::BeginStep(int64_t tokens) {
  const int64_t rows = batch_size();
  tokens_ = tokens;
  span_ = 0;
  fresh_ = tokens > 1;
  for (const PagedRow& row : rows_) {
    span_ = std::max(span_, row.cached + tokens);
    fresh_ = fresh_ && row.cached == 0 && row.new_tokens == tokens;
  }
  // Slot indices are built on the host (tables are host data) and copied once per forward.
  std::vector<int64_t> write(static_cast<size_t>(rows * tokens));
  for (int64_t b = 0; b < rows; ++b) {
    const PagedRow& row = rows_[b];
    for (int64_t t = 0; t < tokens; ++t) {
      // Padding past the row's new tokens goes to scratch, never into a block of the row.
      write[b * tokens + t] = t < row.new_tokens ? SlotOf(row, row.cached + t) : scratch_slot();
    }
  }
  const auto device = options_.device;
  const auto long_options = torch::TensorOptions().dtype(torch::kLong);
  write_slots_ = torch::tensor(write, long_options).to(device);
  if (fresh_) return;  // Attend reads the step's own keys: no gather, no mask
  std::vector<int64_t> read(static_cast<size_t>(rows * span_));
  for (int64_t b = 0; b < rows; ++b) {
    const PagedRow& row = rows_[b];
    for (int64_t s = 0; s < span_; ++s) {
      read[b * span_ + s] = s < row.cached + row.new_tokens ? SlotOf(row, s) : scratch_slot();
    }
  }
  read_slots_ = torch::tensor(read, long_options).to(device);
  const torch::Tensor start = torch::tensor(lengths_, long_options).to(device).view({rows, 1});
  const torch::Tensor positions =
      start + torch::arange(tokens, long_options.device(device)).view({1, tokens});  // [B, T]
  const torch::Tensor key_positions = torch::arange(span_, long_options.device(device));
  mask_ = (key_positions.view({1, 1, 1, span_}) <= positions.view({rows, 1, tokens, 1}));
}

torch::Tensor PagedKvCache::Attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                                   const torch::Tensor& v) {
  const int64_t rows = batch_size();
  const int64_t kv_heads = options_.kv_heads;
  const int64_t d = options_.head_dim;
  torch::Tensor& keys = keys_.at(layer);
  torch::Tensor& values = values_.at(layer);
  // [B, kv_heads, T, D] -> [B * T, kv_heads, D], in slot order of write_slots_.
  auto flat = [&](const torch::Tensor& t) {
    return t.transpose(1, 2).reshape({rows * tokens_, kv_heads, d}).to(keys.scalar_type());
  };
  keys.index_copy_(0, write_slots_, flat(k));
  values.index_copy_(0, write_slots_, flat(v));
  if (fresh_) {
    // The keys as the cache holds them (rounded to its dtype), as later steps will read them.
    return GroupedQueryAttention(q, k.to(keys.scalar_type()).to(q.scalar_type()),
                                 v.to(values.scalar_type()).to(q.scalar_type()), torch::Tensor());
  }
  auto gather = [&](const torch::Tensor& pool) {  // -> [B, kv_heads, span, D]
    return pool.index_select(0, read_slots_).view({rows, span_, kv_heads, d}).transpose(1, 2);
  };
  return GroupedQueryAttention(q, gather(keys).to(q.scalar_type()),
                               gather(values).to(q.scalar_type()), mask_);
}

void PagedKvCache::EndStep(const std::vector<int64_t>& valid) {
  for (size_t b = 0; b < rows_.size(); ++b) {
    rows_[b].cached += valid.at(b);
    lengths_[b] = rows_[b].cached;
  }
  write_slots_ = torch::Tensor();
  read_slots_ = torch::Tensor();
  mask_ = torch::Tensor();
}

int64_t PagedKvCache::bytes() const {
  int64_t n = 0;
  for (size_t i = 0; i < keys_.size(); ++i) {
    n += static_cast<int64_t>(keys_[i].nbytes() + values_[i].nbytes());
  }
  return n;
}

}  // namespace lorad::engine
