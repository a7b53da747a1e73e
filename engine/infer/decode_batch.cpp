#include "engine/infer/decode_batch.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/model/kernel_launch.h"
#include "kernels/layer_ops.h"
#include "kernels/paged_attention.h"

#if defined(LORAD_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace lorad::engine {

DecodeBatch::DecodeBatch(PagedKvCache* cache, int64_t rows) : cache_(cache), rows_(rows) {
  const PagedKvCacheOptions& o = cache->options();
  // A row never holds more than the context or the whole pool.
  max_blocks_ = std::min((o.max_context + o.block_size - 1) / o.block_size, o.num_blocks);
  const bool cuda = o.device.is_cuda();
  const auto host = torch::TensorOptions().pinned_memory(cuda);
  host_longs_ = torch::zeros({3 * rows}, host.dtype(torch::kLong));
  host_ints_ = torch::zeros({(2 + max_blocks_) * rows}, host.dtype(torch::kInt));
  device_longs_ = cuda ? host_longs_.to(o.device) : host_longs_;
  device_ints_ = cuda ? host_ints_.to(o.device) : host_ints_;
  ids_ = device_longs_.narrow(0, 0, rows);
  positions_ = device_longs_.narrow(0, rows, rows);
  write_slots_ = device_longs_.narrow(0, 2 * rows, rows);
  context_lens_ = device_ints_.narrow(0, 0, rows);
  lora_slots_ = device_ints_.narrow(0, rows, rows);
  block_tables_ = device_ints_.narrow(0, 2 * rows, rows * max_blocks_).view({rows, max_blocks_});
  lengths_.assign(static_cast<size_t>(rows), 0);
}

absl::Status DecodeBatch::Fill(const std::vector<DecodeRow>& rows, int32_t none_lora_slot) {
  const PagedKvCacheOptions& o = cache_->options();
  if (static_cast<int64_t>(rows.size()) > rows_) {
    return absl::InvalidArgumentError(
        absl::StrCat("a decode batch of ", rows_, " rows got ", rows.size()));
  }
  for (size_t b = 0; b < rows.size(); ++b) {
    const DecodeRow& row = rows[b];
    if (auto s = cache_->CheckRow(b, {row.block_table, row.position, 1}); !s.ok()) return s;
    if (static_cast<int64_t>(row.block_table.size()) > max_blocks_) {
      return absl::InvalidArgumentError(absl::StrCat("decode row ", b, " names ",
                                                     row.block_table.size(), " blocks; at most ",
                                                     max_blocks_, " fit a row"));
    }
  }
#if defined(LORAD_WITH_CUDA)
  if (copied_.has_value()) copied_->synchronize();
#endif
  int64_t* longs = host_longs_.data_ptr<int64_t>();
  int32_t* ints = host_ints_.data_ptr<int32_t>();
  const int32_t scratch = cache_->scratch_block();
  for (int64_t b = 0; b < rows_; ++b) {
    const bool real = b < static_cast<int64_t>(rows.size());
    const int64_t position = real ? rows[b].position : 0;
    const int32_t block = real ? rows[b].block_table[position / o.block_size] : scratch;
    longs[b] = real ? rows[b].token : 0;
    longs[rows_ + b] = position;
    longs[2 * rows_ + b] = block * o.block_size + position % o.block_size;
    ints[b] = static_cast<int32_t>(position + 1);
    ints[rows_ + b] = real && rows[b].lora_slot >= 0 ? rows[b].lora_slot : none_lora_slot;
    int32_t* table = ints + 2 * rows_ + b * max_blocks_;
    for (int64_t i = 0; i < max_blocks_; ++i) {
      table[i] = real && i < static_cast<int64_t>(rows[b].block_table.size())
                     ? rows[b].block_table[i]
                     : scratch;
    }
    lengths_[b] = position;
  }
  if (device_longs_.data_ptr() != host_longs_.data_ptr()) {
#if defined(LORAD_WITH_CUDA)
    // Asynchronous, so the host goes on to launch the step at once (a blocking copy waited for a
    // round trip to the device twice a step); copied_ keeps the next Fill from rewriting the host
    // buffers under a copy still in flight.
    device_longs_.copy_(host_longs_, /*non_blocking=*/true);
    device_ints_.copy_(host_ints_, /*non_blocking=*/true);
    if (!copied_.has_value()) copied_.emplace();
    copied_->record(c10::cuda::getCurrentCUDAStream(device_longs_.device().index()));
#endif
  }
  return absl::OkStatus();
}

void DecodeBatch::BeginStep(int64_t tokens) {
  TORCH_CHECK(tokens == 1, "a decode batch brings one token per row, not ", tokens);
}

void DecodeBatch::EndStep(const std::vector<int64_t>& /*valid*/) {}

torch::Tensor DecodeBatch::Attend(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                                  const torch::Tensor& v) {
  const PagedKvCacheOptions& o = cache_->options();
  const int64_t d = o.head_dim;
  torch::Tensor& keys = cache_->keys(layer);
  torch::Tensor& values = cache_->values(layer);
  keys.index_copy_(0, write_slots_, k.reshape({rows_, o.kv_heads, d}).to(keys.scalar_type()));
  values.index_copy_(0, write_slots_, v.reshape({rows_, o.kv_heads, d}).to(keys.scalar_type()));
  const torch::Tensor qc = q.reshape({rows_, q.size(1), d}).to(keys.scalar_type()).contiguous();
  return PagedAttend(layer, qc).to(q.scalar_type());
}

torch::Tensor DecodeBatch::AttendRotating(int64_t layer, const torch::Tensor& q,
                                          const torch::Tensor& k, const torch::Tensor& v,
                                          const torch::Tensor& cos, const torch::Tensor& sin) {
  const PagedKvCacheOptions& o = cache_->options();
  torch::Tensor& keys = cache_->keys(layer);
  torch::Tensor& values = cache_->values(layer);
  const torch::ScalarType dtype = keys.scalar_type();
  const bool fused_dtype = dtype == torch::kFloat || dtype == torch::kBFloat16;
  if (!fused_dtype || q.scalar_type() != dtype || k.scalar_type() != dtype ||
      v.scalar_type() != dtype || q.size(1) != 1 || q.device() != keys.device()) {
    return torch::Tensor();
  }
  const int64_t d = o.head_dim;
  const int64_t heads = q.size(2);
  const torch::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const torch::Tensor c = cos.to(dtype).contiguous(), s = sin.to(dtype).contiguous();
  if (qc.is_cuda()) {  // one launch: the attention rotates and writes the new keys itself
    kernels::PagedAttentionRotary rotary;
    rotary.k = kc.data_ptr(), rotary.v = vc.data_ptr();
    rotary.cos = c.data_ptr(), rotary.sin = s.data_ptr();
    rotary.slots = write_slots_.data_ptr<int64_t>();
    return PagedAttend(layer, qc.view({rows_, heads, d}), &rotary);
  }
  torch::Tensor q_rotated = torch::empty({rows_, heads, d}, q.options());
  kernels::RotaryStoreArgs args;
  args.q = qc.data_ptr(), args.k = kc.data_ptr(), args.v = vc.data_ptr();
  args.cos = c.data_ptr(), args.sin = s.data_ptr(), args.slots = write_slots_.data_ptr<int64_t>();
  args.q_out = q_rotated.data_ptr(), args.k_pool = keys.data_ptr();
  args.v_pool = values.data_ptr();
  args.rows = rows_, args.heads = heads, args.kv_heads = o.kv_heads, args.head_dim = d;
  const kernels::FloatKind kind = *FloatKindOf(dtype);
  RunKernel(
      qc, "rotary_store_cuda", [&] { kernels::rotary_store_cpu(args, kind); },
      [&](void* stream) { return kernels::rotary_store_cuda(args, kind, stream); });
  return PagedAttend(layer, q_rotated);
}

torch::Tensor DecodeBatch::PagedAttend(int64_t layer, const torch::Tensor& qc,
                                       const kernels::PagedAttentionRotary* rotary) {
  const PagedKvCacheOptions& o = cache_->options();
  const int64_t heads = qc.size(1);
  const int64_t d = o.head_dim;
  const torch::Tensor& keys = cache_->keys(layer);
  const torch::Tensor& values = cache_->values(layer);
  torch::Tensor out = torch::empty_like(qc);
  kernels::PagedAttentionShape shape;
  shape.rows = rows_;
  shape.heads = heads;
  shape.kv_heads = o.kv_heads;
  shape.head_dim = d;
  shape.block_size = o.block_size;
  shape.max_blocks = max_blocks_;
  TORCH_CHECK(keys.scalar_type() == torch::kFloat || keys.scalar_type() == torch::kBFloat16,
              "paged decode attention needs fp32 or bf16, not ", keys.scalar_type());
  const kernels::FloatKind kind = *FloatKindOf(keys.scalar_type());
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  if (qc.is_cuda()) {
#if defined(LORAD_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(qc.device());
    if (rotary != nullptr) {
      CheckLaunch(kernels::paged_attention_rotary_cuda(
                      qc.data_ptr(), keys.data_ptr(), values.data_ptr(), kind,
                      block_tables_.data_ptr<int32_t>(), context_lens_.data_ptr<int32_t>(), shape,
                      scale, *rotary, out.data_ptr(), CurrentStream(qc.device())),
                  "paged_attention_rotary_cuda");
    } else {
      CheckLaunch(kernels::paged_attention_cuda(qc.data_ptr(), keys.data_ptr(), values.data_ptr(),
                                                kind, block_tables_.data_ptr<int32_t>(),
                                                context_lens_.data_ptr<int32_t>(), shape, scale,
                                                out.data_ptr(), CurrentStream(qc.device())),
                  "paged_attention_cuda");
    }
#else
    TORCH_CHECK(false, "paged decode attention: this build has no CUDA kernels");
#endif
  } else {
    TORCH_CHECK(rotary == nullptr, "paged decode attention: the rotary launch is CUDA only");
    const char* bad = kernels::paged_attention_check(shape);
    TORCH_CHECK(bad[0] == '\0', bad);
    kernels::paged_attention_cpu(qc.data_ptr(), keys.data_ptr(), values.data_ptr(), kind,
                                 block_tables_.data_ptr<int32_t>(),
                                 context_lens_.data_ptr<int32_t>(), shape, scale, out.data_ptr());
  }
  return out.view({rows_, heads, 1, d});
}

}  // namespace lorad::engine
