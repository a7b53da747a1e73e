// LlamaModel: the decoder-only forward of the Llama family (LlamaForCausalLM incl. Llama 3.x rope
// scaling, TinyLlama, SmolLM; MistralForCausalLM; Qwen2ForCausalLM with q/k/v biases) on a frozen
// base, float or NF4, with LoRA adapters applied as attached data.
//
// Numerics follow transformers: RMSNorm in fp32 then cast back, RoPE angles in fp32, SiLU MLP,
// causal attention through scaled_dot_product_attention with grouped-query heads. CPU fp32 matches
// transformers within 1e-4 (tests/parity/llama_parity_test.cpp); CUDA runs bf16.
//
// Base weights: kFloat keeps every weight in the compute dtype (exact); kNf4 quantizes the seven
// projections of every layer to NF4 at load (or reads a bitsandbytes pre-quantized checkpoint),
// embeddings, norms and lm_head stay in the compute dtype. The base never requires grad.
//
// Threading: immutable after Load; Forward is const and may run concurrently on different caches
// (the GPU loop calls it from one thread).
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/lora/lora_adapter.h"
#include "engine/lora/lora_applier.h"
#include "engine/model/attention_cache.h"
#include "engine/model/base_linear.h"
#include "engine/model/contiguous_kv_cache.h"
#include "engine/model/model_config.h"
#include "engine/model/model_weights.h"
#include "engine/model/rope.h"

namespace lorad::engine {

enum class BaseWeights { kFloat, kNf4 };
// "none" (keep float) or "nf4"; anything else is an error naming the choices.
absl::StatusOr<BaseWeights> BaseWeightsFromName(const std::string& name);

struct LlamaModelOptions {
  BaseWeights base = BaseWeights::kFloat;
  torch::Device device = torch::kCPU;
  torch::ScalarType dtype = torch::kFloat;  // compute dtype: fp32 on CPU, bf16 on CUDA
};

// The tokens of one forward. Rows are right-padded to T.
struct ForwardBatch {
  torch::Tensor input_ids;       // [B, T] int64 (any device; moved to the model's)
  std::vector<int64_t> lengths;  // [B] valid tokens per row, 1..T; empty = every row is T long
  // [B, T] int64 token positions (forwards without a cache only), or undefined: 0, 1, 2, ... in
  // every row. Where a row's positions do not go up by one, another sequence starts: its tokens
  // attend only to the tokens of their own sequence (packed examples kept apart, as transformers
  // reads packed position_ids).
  torch::Tensor positions{};  // {}: brace-initialized batches may leave it out
};

enum class LogitsMode {
  kAll,   // [B, T, vocab]
  kLast,  // [B, vocab]: each row's last valid position (what sampling needs)
};

// How one forward runs: one adapter for the whole batch (`adapter`), or any LoraApplier (`lora`,
// e.g. MultiLoraApplier with an adapter per row; it wins over `adapter`). The model only sees a
// LoraApplier.
struct ForwardOptions {
  const LoraAdapter* adapter = nullptr;  // nullptr: the base model; must outlive backward
  const LoraApplier* lora = nullptr;     // borrowed for the call; inference only
  bool train = false;  // record autograd (into the adapter's tensors) and apply LoRA dropout
  LogitsMode logits = LogitsMode::kAll;
  // Return the final-norm hidden states ([B, T, hidden], or [B, hidden] with kLast) instead of
  // logits: the trainer applies lm_head() itself, chunk by chunk, so full-vocabulary logits are
  // never held for the whole batch.
  bool hidden_states = false;
  // Training without a cache: keep only each decoder layer's input and recompute the layer in
  // backward (gradient checkpointing), trading one more forward for the layers' activations.
  bool checkpoint_layers = false;
  // With checkpoint_layers on CUDA: keep the saved layer inputs in pinned host memory.
  bool offload_checkpoints = false;
  // With checkpoint_layers: the last N decoder layers are not checkpointed but keep their
  // activations for backward, which then skips their recompute (their backward comes first, so
  // they are held only until the backward starts). Values above the layer count mean every layer.
  int64_t checkpoint_skip_last = 0;
  // With checkpoint_layers: this many of the checkpointed layers (spread evenly) keep their
  // MLP's gate and up outputs for backward, whose recompute then skips those two products (the
  // largest: about 2/3 of a layer's recompute). With offload_checkpoints they wait in pinned host
  // memory (2 x tokens x intermediate_size values a layer); else on the device. The spread
  // includes the last checkpointed layer, whose values are copied out last and needed first: its
  // copy back is hidden by the backward of the layers kept out of checkpointing after it, not
  // without them (measured with 4-6 such layers: bench/results/*-keep-mlp-cap-10*.txt).
  int64_t checkpoint_keep_mlp = 0;
};

// The ignored label (transformers' and PyTorch's ignore_index).
constexpr int64_t kIgnoreLabel = -100;

class LlamaModel {
 public:
  // Reads <folder>/config.json and its safetensors checkpoint. Errors name the folder and the
  // field or tensor at fault.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& folder,
                                                          const LlamaModelOptions& options);
  static absl::StatusOr<std::unique_ptr<LlamaModel>> FromWeights(const ModelConfig& config,
                                                                 const ModelWeights& weights,
                                                                 const LlamaModelOptions& options);

  // Logits (see LogitsMode) in the compute dtype. With `cache`, row b's tokens take positions
  // cache->lengths()[b] onwards and attend to what the cache holds (prefill and decode are the
  // same call: T new tokens per row); without, positions start at 0 and only the batch is
  // attended. Errors: ids out of range, lengths, cache shape or capacity, adapter shapes.
  absl::StatusOr<torch::Tensor> Forward(const ForwardBatch& batch, AttentionCache* cache,
                                        const ForwardOptions& options) const;

  // One decode token per row with every input already on the model's device, for the inference
  // engine's decode steps: ids and positions [B] int64, `cache` a DecodeBatch (or any cache that
  // takes one token per row at the given positions). No host-to-device copy, no check that waits
  // for the device: a CUDA graph can capture it (the caller validated ids and positions).
  // Returns logits [B, vocab] in the compute dtype.
  torch::Tensor DecodeStep(const torch::Tensor& ids, const torch::Tensor& positions,
                           AttentionCache* cache, const LoraApplier* lora) const;

  // Training loss: mean next-token cross entropy over labels [B, T] (label at t is the token at
  // t; positions with kIgnoreLabel, and padding, are skipped), as transformers' ForCausalLMLoss.
  // A scalar f32 with autograd into the adapter when options.train.
  absl::StatusOr<torch::Tensor> Loss(const ForwardBatch& batch, const torch::Tensor& labels,
                                     const ForwardOptions& options) const;

  // A cache for `batch_size` rows of up to `capacity` tokens, on the model's device and dtype.
  absl::StatusOr<std::unique_ptr<ContiguousKvCache>> NewCache(int64_t batch_size,
                                                              int64_t capacity) const;

  const ModelConfig& config() const { return config_; }
  // [vocab, hidden] in the compute dtype; frozen (see ForwardOptions::hidden_states).
  const torch::Tensor& lm_head() const { return lm_head_; }
  const LlamaModelOptions& options() const { return options_; }
  // Whether packed rows kept apart attend through flash attention's variable-length segments
  // here (PackedSequences::FlashRuns for this device, dtype and head_dim), not a mask.
  bool PacksWithFlash() const {
    return PackedSequences::FlashRuns(embed_tokens_, config_.head_dim);
  }
  // The folder's projections were quantized by bitsandbytes (a "-bnb-4bit" model): there is no
  // 16-bit base to merge an adapter into.
  bool bitsandbytes_checkpoint() const { return bitsandbytes_checkpoint_; }
  // ModelWeights::Fingerprint of the checkpoint it was loaded from.
  const std::string& weights_fingerprint() const { return weights_fingerprint_; }
  // Device bytes of the base weights.
  int64_t bytes() const;
  // Every tensor of the base (float weights, NF4 parts, norms, embeddings): for memory accounting
  // and for tests that the base stays frozen.
  std::vector<torch::Tensor> base_tensors() const;

 private:
  struct DecoderLayer {
    torch::Tensor input_norm;                             // [hidden]
    torch::Tensor post_attention_norm;                    // [hidden]
    std::array<BaseLinear, kNumProjections> projections;  // indexed by Projection
  };

  LlamaModel() = default;
  absl::Status CheckBatch(const ForwardBatch& batch, const AttentionCache* cache,
                          const ForwardOptions& options) const;
  torch::Tensor RmsNorm(const torch::Tensor& x, const torch::Tensor& weight) const;
  // value_needed false: only the autograd graph is wanted (BaseLinear::ForwardGraphOnly).
  torch::Tensor Project(const DecoderLayer& layer, int64_t index, Projection projection,
                        const torch::Tensor& x, const LoraApplier* lora,
                        bool value_needed = true) const;
  // Projections of one input (q, k, v; gate, up): the base outputs at once
  // (BaseLinear::ForwardShared), then the LoRA updates of all of them at once
  // (LoraApplier::ApplyShared). Without `value_needed`, only their autograd graph: the caller
  // gives the outputs their values (WithParkedValue).
  std::vector<torch::Tensor> ProjectShared(const DecoderLayer& layer, int64_t index,
                                           const std::vector<Projection>& projections,
                                           const torch::Tensor& x, const LoraApplier* lora,
                                           bool value_needed = true) const;
  // x [B, T, hidden] -> [B, T, hidden]; value_needed as Project's, for the output projection.
  torch::Tensor Attention(const DecoderLayer& layer, int64_t index, const torch::Tensor& x,
                          const torch::Tensor& cos, const torch::Tensor& sin,
                          const PackedSequences& packed, AttentionCache* cache,
                          const LoraApplier* lora, bool value_needed = true) const;
  torch::Tensor Mlp(const DecoderLayer& layer, int64_t index, const torch::Tensor& x,
                    const LoraApplier* lora, bool value_needed = true) const;
  // The residual stream between layers with its last add deferred: its value is stream +
  // pending (pending undefined: nothing to add), so the add can run in the kernel of the RMSNorm
  // that reads it (FusedAddRmsNorm) instead of a launch of its own.
  struct Residual {
    torch::Tensor stream;
    torch::Tensor pending;
    // stream + pending, the add done now.
    torch::Tensor Value() const { return pending.defined() ? stream + pending : stream; }
  };
  // (stream + pending, RmsNorm of it); the add fused into the norm where the fused ops run.
  std::pair<torch::Tensor, torch::Tensor> AddRmsNorm(const Residual& r,
                                                     const torch::Tensor& weight) const;
  // Decoder layer `index` on the residual stream r: attention on the RMS-normed r, added, then
  // the MLP on the normed sum, whose output is left pending. With output_needed false (a
  // checkpointed layer's recompute, run only for its backward) the result carries the exact
  // backward but undefined values: the down projection is not computed.
  Residual Block(int64_t index, const Residual& r, const torch::Tensor& cos,
                 const torch::Tensor& sin, const PackedSequences& packed, AttentionCache* cache,
                 const LoraApplier* lora, bool output_needed = true) const;
  // Block under gradient checkpointing, as two pieces that each keep only their input: the
  // attention half (x -> x + attention) and the MLP half (h -> h + MLP, the add left pending).
  // Each piece's recompute (run only for its backward, which never reads the piece's output)
  // skips the product whose output only that output needs: o_proj in the first, down_proj in the
  // second. Keeping h as well as x costs [B, T, hidden] a layer and saves o_proj's recompute
  // (8B shape, 2 x 2048 tokens: 349.6 -> 343.1 ms a step, 7.72 -> 8.50 GiB). With `offload` both
  // inputs wait in pinned host memory, copied out and back on a side stream while layers compute
  // (CheckpointedCall). With `keep_mlp` the MLP piece parks its gate and up values (with its
  // input) and its recompute takes them instead of computing the two products again.
  Residual CheckpointedBlock(int64_t index, const torch::Tensor& x, const torch::Tensor& cos,
                             const torch::Tensor& sin, const PackedSequences& packed,
                             const std::shared_ptr<const LoraApplier>& lora, bool offload,
                             bool keep_mlp) const;
  torch::Tensor ForwardOrThrow(const ForwardBatch& batch, AttentionCache* cache,
                               const ForwardOptions& options) const;

  ModelConfig config_;
  LlamaModelOptions options_;
  bool bitsandbytes_checkpoint_ = false;
  std::string weights_fingerprint_;
  torch::Tensor embed_tokens_;  // [vocab, hidden]
  torch::Tensor final_norm_;    // [hidden]
  torch::Tensor lm_head_;       // [vocab, hidden]; the embedding itself when tied
  std::vector<DecoderLayer> layers_;
  RotaryEmbedding rope_;
};

}  // namespace lorad::engine
