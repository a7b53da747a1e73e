#include "engine/model/llama_model.h"

#include <algorithm>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/checkpointed_call.h"
#include "engine/model/fused_layer_ops.h"

namespace lorad::engine {
namespace {

using Shape = std::vector<int64_t>;

std::string LayerName(int64_t layer, const std::string& rest) {
  return absl::StrCat("model.layers.", layer, ".", rest);
}

// [out, in] of each projection, from config.json.
Shape ProjectionShape(const ModelConfig& c, Projection p) {
  const int64_t q = c.num_attention_heads * c.head_dim;
  const int64_t kv = c.num_key_value_heads * c.head_dim;
  switch (p) {
    case Projection::kQ:
      return {q, c.hidden_size};
    case Projection::kK:
    case Projection::kV:
      return {kv, c.hidden_size};
    case Projection::kO:
      return {c.hidden_size, q};
    case Projection::kGate:
    case Projection::kUp:
      return {c.intermediate_size, c.hidden_size};
    case Projection::kDown:
      return {c.hidden_size, c.intermediate_size};
  }
  return {};
}

bool IsQkv(Projection p) {
  return p == Projection::kQ || p == Projection::kK || p == Projection::kV;
}

// Whether transformers' module for this projection has a bias: Qwen2's q/k/v; Llama's attention
// projections under attention_bias and MLP under mlp_bias; Mistral none. A bias the module does
// not have is not read even when the checkpoint holds one (transformers drops it as unexpected).
bool HasBias(const ModelConfig& config, Projection p) {
  if (config.architecture == "MistralForCausalLM") return false;
  if (config.architecture == "Qwen2ForCausalLM") return config.attention_bias && IsQkv(p);
  const bool attention = IsQkv(p) || p == Projection::kO;
  return attention ? config.attention_bias : config.mlp_bias;
}

// Loads one projection: float or NF4 per `options.base`, from a float or a bitsandbytes 4-bit
// checkpoint tensor, with its bias where the module has one (HasBias). In a bitsandbytes
// checkpoint a float projection is one it left 16-bit on purpose (llm_int8_skip_modules, the
// sensitive layers of "dynamic" 4-bit downloads): it stays float, as transformers keeps it.
absl::StatusOr<BaseLinear> LoadProjection(const ModelConfig& config, const ModelWeights& weights,
                                          const LlamaModelOptions& options, int64_t layer,
                                          Projection p, bool bitsandbytes_checkpoint) {
  const std::string path = ProjectionPath(layer, p);
  const std::string weight_name = path + ".weight";
  const std::string bias_name = path + ".bias";
  const Shape shape = ProjectionShape(config, p);
  torch::Tensor bias;
  if (HasBias(config, p)) {
    auto b = weights.Get(bias_name, options.dtype, options.device, Shape{shape[0]});
    if (!b.ok()) return b.status();
    bias = *b;
  }
  if (weights.IsBitsandbytes4bit(weight_name)) {
    auto nf4 = weights.GetNf4(weight_name, shape, options.device);
    if (!nf4.ok()) return nf4.status();
    if (options.base == BaseWeights::kNf4) return BaseLinear::Nf4(*std::move(nf4), bias);
    return BaseLinear::Float(nf4->Dequantize(options.dtype), bias);
  }
  if (options.base == BaseWeights::kFloat || bitsandbytes_checkpoint) {
    auto w = weights.Get(weight_name, options.dtype, options.device, shape);
    if (!w.ok()) return w.status();
    return BaseLinear::Float(*w, bias);
  }
  // Quantize from the checkpoint's own precision (as bitsandbytes does when it loads a model).
  const TensorView* view = weights.Find(weight_name);
  const torch::ScalarType source =
      view != nullptr && (view->dtype == DType::kBF16 || view->dtype == DType::kF16)
          ? TorchDType(view->dtype)
          : torch::kFloat;
  auto w = weights.Get(weight_name, source, options.device, shape);
  if (!w.ok()) return w.status();
  auto nf4 = Nf4Tensor::Quantize(*w);
  if (!nf4.ok()) {
    return absl::Status(nf4.status().code(),
                        absl::StrCat("quantizing '", weight_name, "' in '", weights.folder(),
                                     "': ", nf4.status().message()));
  }
  return BaseLinear::Nf4(*std::move(nf4), bias);
}

absl::Status Invalid(const std::string& what) { return absl::InvalidArgumentError(what); }

}  // namespace

absl::StatusOr<BaseWeights> BaseWeightsFromName(const std::string& name) {
  if (name == "none") return BaseWeights::kFloat;
  if (name == "nf4") return BaseWeights::kNf4;
  return Invalid(absl::StrCat("base weight format '", name, "' is unknown (known: none, nf4)"));
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& folder,
                                                             const LlamaModelOptions& options) {
  auto config = ModelConfig::LoadFromFolder(folder);
  if (!config.ok()) return config.status();
  auto weights = ModelWeights::Open(folder);
  if (!weights.ok()) return weights.status();
  return FromWeights(*config, *weights, options);
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::FromWeights(
    const ModelConfig& config, const ModelWeights& weights, const LlamaModelOptions& options) {
  if (!c10::isFloatingType(options.dtype)) {
    return Invalid(
        absl::StrCat("compute dtype ", c10::toString(options.dtype), " is not a float dtype"));
  }
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  m->config_ = config;
  m->options_ = options;
  m->weights_fingerprint_ = weights.Fingerprint();
  // Any tensor: a folder may keep some layers 16-bit (llm_int8_skip_modules).
  for (const std::string& name : weights.names()) {
    if (weights.IsBitsandbytes4bit(name)) m->bitsandbytes_checkpoint_ = true;
  }
  const auto& o = options;
  const Shape hidden{config.hidden_size};
  const Shape embedding{config.vocab_size, config.hidden_size};
  try {
    torch::NoGradGuard no_grad;
    // A tied checkpoint saved with only the lm_head (safetensors' save_model keeps one name of
    // a shared tensor) holds the embedding there, and transformers ties it back.
    const bool embedding_in_head = config.tie_word_embeddings &&
                                   !weights.Contains("model.embed_tokens.weight") &&
                                   weights.Contains("lm_head.weight");
    auto embed = weights.Get(embedding_in_head ? "lm_head.weight" : "model.embed_tokens.weight",
                             o.dtype, o.device, embedding);
    if (!embed.ok()) return embed.status();
    m->embed_tokens_ = *embed;
    auto norm = weights.Get("model.norm.weight", o.dtype, o.device, hidden);
    if (!norm.ok()) return norm.status();
    m->final_norm_ = *norm;
    // transformers 5 ties only when the checkpoint has no lm_head of other values than the
    // embedding: a distinct one (a fine-tune saved untied) is used as it is.
    if (config.tie_word_embeddings) {
      m->lm_head_ = m->embed_tokens_;
      if (weights.Contains("lm_head.weight")) {
        auto head = weights.Get("lm_head.weight", o.dtype, o.device, embedding);
        if (!head.ok()) return head.status();
        if (!torch::equal(*head, m->embed_tokens_)) m->lm_head_ = *head;
      }
    } else if (weights.IsBitsandbytes4bit("lm_head.weight")) {
      // Quantized with it (llm_int8_skip_modules without lm_head): lorad keeps lm_head 16-bit.
      auto head = weights.GetNf4("lm_head.weight", embedding, o.device);
      if (!head.ok()) return head.status();
      m->lm_head_ = head->Dequantize(o.dtype);
    } else {
      auto head = weights.Get("lm_head.weight", o.dtype, o.device, embedding);
      if (!head.ok()) {
        return absl::Status(head.status().code(),
                            absl::StrCat(head.status().message(),
                                         " (config.json has tie_word_embeddings false, so the "
                                         "checkpoint needs its own lm_head)"));
      }
      m->lm_head_ = *head;
    }
    m->layers_.resize(static_cast<size_t>(config.num_hidden_layers));
    for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
      DecoderLayer& layer = m->layers_[i];
      auto in_norm = weights.Get(LayerName(i, "input_layernorm.weight"), o.dtype, o.device, hidden);
      if (!in_norm.ok()) return in_norm.status();
      layer.input_norm = *in_norm;
      auto post_norm =
          weights.Get(LayerName(i, "post_attention_layernorm.weight"), o.dtype, o.device, hidden);
      if (!post_norm.ok()) return post_norm.status();
      layer.post_attention_norm = *post_norm;
      for (int p = 0; p < kNumProjections; ++p) {
        auto linear = LoadProjection(config, weights, o, i, static_cast<Projection>(p),
                                     m->bitsandbytes_checkpoint_);
        if (!linear.ok()) return linear.status();
        layer.projections[p] = *std::move(linear);
      }
    }
    m->rope_ = RotaryEmbedding(config.rope, config.head_dim, o.device);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("loading the model in '", weights.folder(), "' onto ",
                                            o.device.str(), ": ", e.what_without_backtrace()));
  }
  return m;
}

absl::StatusOr<std::unique_ptr<ContiguousKvCache>> LlamaModel::NewCache(int64_t batch_size,
                                                                        int64_t capacity) const {
  if (batch_size <= 0 || capacity <= 0) {
    return Invalid(absl::StrCat("a KV cache needs a positive batch size and capacity, got ",
                                batch_size, " rows of ", capacity, " tokens"));
  }
  ContiguousKvCacheOptions c;
  c.num_layers = config_.num_hidden_layers;
  c.batch_size = batch_size;
  c.kv_heads = config_.num_key_value_heads;
  c.head_dim = config_.head_dim;
  c.capacity = capacity;
  c.dtype = options_.dtype;
  c.device = options_.device;
  try {
    return std::make_unique<ContiguousKvCache>(c);
  } catch (const c10::Error& e) {
    return absl::ResourceExhaustedError(absl::StrCat("allocating a KV cache of ", batch_size, " x ",
                                                     capacity, " tokens on ", options_.device.str(),
                                                     ": ", e.what_without_backtrace()));
  }
}

int64_t LlamaModel::bytes() const {
  int64_t n = static_cast<int64_t>(embed_tokens_.nbytes() + final_norm_.nbytes());
  if (!lm_head_.is_same(embed_tokens_)) n += static_cast<int64_t>(lm_head_.nbytes());
  for (const DecoderLayer& layer : layers_) {
    n += static_cast<int64_t>(layer.input_norm.nbytes() + layer.post_attention_norm.nbytes());
    for (const BaseLinear& p : layer.projections) n += p.bytes();
  }
  return n;
}

std::vector<torch::Tensor> LlamaModel::base_tensors() const {
  std::vector<torch::Tensor> out = {embed_tokens_, final_norm_, lm_head_};
  for (const DecoderLayer& layer : layers_) {
    out.push_back(layer.input_norm);
    out.push_back(layer.post_attention_norm);
    for (const BaseLinear& p : layer.projections) {
      for (const torch::Tensor& t : p.tensors()) out.push_back(t);
    }
  }
  return out;
}

absl::Status LlamaModel::CheckBatch(const ForwardBatch& batch, const AttentionCache* cache,
                                    const ForwardOptions& options) const {
  const torch::Tensor& ids = batch.input_ids;
  if (!ids.defined() || ids.dim() != 2 || ids.size(0) < 1 || ids.size(1) < 1) {
    return Invalid(absl::StrCat(
        "input_ids must be [batch, tokens] with at least one token, got ",
        ids.defined() ? absl::StrCat("[", absl::StrJoin(ids.sizes(), ", "), "]") : "none"));
  }
  if (ids.scalar_type() != torch::kLong && ids.scalar_type() != torch::kInt) {
    return Invalid(absl::StrCat("input_ids must be int64, got ", c10::toString(ids.scalar_type())));
  }
  const int64_t rows = ids.size(0);
  const int64_t tokens = ids.size(1);
  if (!batch.lengths.empty()) {
    if (static_cast<int64_t>(batch.lengths.size()) != rows) {
      return Invalid(absl::StrCat("lengths has ", batch.lengths.size(), " entries for ", rows,
                                  " rows of input_ids"));
    }
    for (size_t b = 0; b < batch.lengths.size(); ++b) {
      if (batch.lengths[b] < 1 || batch.lengths[b] > tokens) {
        return Invalid(absl::StrCat("lengths[", b, "] is ", batch.lengths[b],
                                    "; it must be in [1, ", tokens, "] (the padded width)"));
      }
    }
  }
  // Out-of-range ids would read outside the embedding (a device-side assert on CUDA).
  const auto [lo, hi] = torch::aminmax(ids);
  const int64_t min_id = lo.item<int64_t>();
  const int64_t max_id = hi.item<int64_t>();
  if (min_id < 0 || max_id >= config_.vocab_size) {
    return Invalid(absl::StrCat("token id ", min_id < 0 ? min_id : max_id,
                                " is outside the vocabulary [0, ", config_.vocab_size, ")"));
  }
  if (batch.positions.defined()) {
    const torch::Tensor& p = batch.positions;
    if (p.dim() != 2 || p.size(0) != rows || p.size(1) != tokens ||
        (p.scalar_type() != torch::kLong && p.scalar_type() != torch::kInt)) {
      return Invalid(absl::StrCat("positions must be int64 [", rows, ", ", tokens,
                                  "] as input_ids, got ", c10::toString(p.scalar_type()), " [",
                                  absl::StrJoin(p.sizes(), ", "), "]"));
    }
    if (cache != nullptr) return Invalid("positions are for forwards without a KV cache");
    const auto [low, high] = torch::aminmax(p);
    if (low.item<int64_t>() < 0 || high.item<int64_t>() >= tokens) {
      return Invalid(absl::StrCat("positions must be in [0, ", tokens, "), got ",
                                  low.item<int64_t>(), " .. ", high.item<int64_t>()));
    }
  }
  if (cache != nullptr) {
    if (cache->batch_size() != rows) {
      return Invalid(
          absl::StrCat("the KV cache has ", cache->batch_size(), " rows, the batch ", rows));
    }
    const auto& held = cache->lengths();
    const int64_t longest = *std::max_element(held.begin(), held.end());
    if (longest + tokens > cache->capacity()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the KV cache holds ", longest, " tokens in its longest row; ", tokens,
                       " more exceed its capacity of ", cache->capacity()));
    }
    if (options.train) {
      return Invalid("training forwards run without a KV cache");
    }
  }
  if (options.adapter != nullptr) {
    if (auto s = options.adapter->ValidateAgainst(config_); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<torch::Tensor> LlamaModel::Forward(const ForwardBatch& batch, AttentionCache* cache,
                                                  const ForwardOptions& options) const {
  try {
    if (auto s = CheckBatch(batch, cache, options); !s.ok()) return s;
    return ForwardOrThrow(batch, cache, options);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("model forward failed: ", e.what_without_backtrace()));
  }
}

torch::Tensor LlamaModel::RmsNorm(const torch::Tensor& x, const torch::Tensor& weight) const {
  if (UseFusedLayerOps(x)) return FusedRmsNorm(x, weight, config_.rms_norm_eps);
  // transformers: in fp32, then back to the input dtype before the weight.
  const torch::Tensor xf = x.to(torch::kFloat);
  const torch::Tensor variance = xf.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (xf * torch::rsqrt(variance + config_.rms_norm_eps)).to(x.scalar_type());
}

torch::Tensor LlamaModel::Project(const DecoderLayer& layer, int64_t index, Projection projection,
                                  const torch::Tensor& x, const LoraApplier* lora,
                                  bool value_needed) const {
  const BaseLinear& base = layer.projections[static_cast<int>(projection)];
  torch::Tensor y = value_needed ? base.Forward(x) : base.ForwardGraphOnly(x);
  return lora == nullptr ? y : lora->Apply(index, projection, x, y);
}

std::vector<torch::Tensor> LlamaModel::ProjectShared(const DecoderLayer& layer, int64_t index,
                                                     const std::vector<Projection>& projections,
                                                     const torch::Tensor& x,
                                                     const LoraApplier* lora,
                                                     bool value_needed) const {
  std::vector<const BaseLinear*> linears;
  linears.reserve(projections.size());
  for (const Projection p : projections) {
    linears.push_back(&layer.projections[static_cast<int>(p)]);
  }
  std::vector<torch::Tensor> ys = BaseLinear::ForwardShared(linears, x, value_needed);
  if (lora == nullptr) return ys;
  return value_needed ? lora->ApplyShared(index, projections, x, ys)
                      : lora->ApplySharedGraphOnly(index, projections, x, ys);
}

torch::Tensor LlamaModel::Attention(const DecoderLayer& layer, int64_t index,
                                    const torch::Tensor& x, const torch::Tensor& cos,
                                    const torch::Tensor& sin, const PackedSequences& packed,
                                    AttentionCache* cache, const LoraApplier* lora,
                                    bool value_needed) const {
  const int64_t rows = x.size(0);
  const int64_t tokens = x.size(1);
  const int64_t d = config_.head_dim;
  auto heads = [&](const torch::Tensor& t) {  // [B, T, n * D] -> [B, n, T, D]
    return t.view({rows, tokens, -1, d}).transpose(1, 2);
  };
  std::vector<torch::Tensor> qkv =
      ProjectShared(layer, index, {Projection::kQ, Projection::kK, Projection::kV}, x, lora);
  torch::Tensor q = std::move(qkv[0]);
  torch::Tensor k = std::move(qkv[1]);
  const auto output = [&](const torch::Tensor& out) {  // [B, heads, T, D]
    return Project(layer, index, Projection::kO, out.transpose(1, 2).reshape({rows, tokens, -1}),
                   lora, value_needed);
  };
  if (cache != nullptr && UseFusedLayerOps(q)) {  // a cache that rotates as it stores: one kernel
    auto split = [&](const torch::Tensor& t) { return t.view({rows, tokens, -1, d}); };
    const torch::Tensor out =
        cache->AttendRotating(index, split(q), split(k), split(qkv[2]), cos, sin);
    if (out.defined()) return output(out);
  }
  const torch::Tensor v = heads(qkv[2]);
  if (UseFusedLayerOps(q)) {  // rotate in the projection's [B, T, heads, D] layout, one kernel
    q = FusedRotary(q.view({rows, tokens, -1, d}), cos, sin).transpose(1, 2);
    k = FusedRotary(k.view({rows, tokens, -1, d}), cos, sin).transpose(1, 2);
  } else {
    q = RotaryEmbedding::Apply(heads(q), cos, sin);
    k = RotaryEmbedding::Apply(heads(k), cos, sin);
  }
  return output(cache != nullptr ? cache->Attend(index, q, k, v)
                                 : PackedAttention(q, k, v, packed));
}

torch::Tensor LlamaModel::Mlp(const DecoderLayer& layer, int64_t index, const torch::Tensor& x,
                              const LoraApplier* lora, bool value_needed) const {
  // Decode rows whose adapters (if any) leave gate and up alone: one launch for both products
  // and the activation.
  if (UseFusedLayerOps(x) && (lora == nullptr || (!lora->Targets(index, Projection::kGate) &&
                                                  !lora->Targets(index, Projection::kUp)))) {
    const torch::Tensor act =
        BaseLinear::SiluMulShared(layer.projections[static_cast<int>(Projection::kGate)],
                                  layer.projections[static_cast<int>(Projection::kUp)], x);
    if (act.defined()) return Project(layer, index, Projection::kDown, act, lora, value_needed);
  }
  // A checkpointed piece that parked gate and up in its forward takes them in its recompute:
  // the same graph (and so the same gradients), without the two largest products.
  const std::vector<torch::Tensor> parked = TakeParked();
  std::vector<torch::Tensor> gate_up = ProjectShared(
      layer, index, {Projection::kGate, Projection::kUp}, x, lora, /*value_needed=*/parked.empty());
  if (parked.size() == gate_up.size()) {
    for (size_t i = 0; i < parked.size(); ++i) gate_up[i] = WithParkedValue(gate_up[i], parked[i]);
  } else {
    TORCH_CHECK(parked.empty(), "Mlp: a recompute took ", parked.size(),
                " parked values, not gate and up");
    ParkForRecompute(gate_up);
  }
  const torch::Tensor& gate = gate_up[0];
  const torch::Tensor& up = gate_up[1];
  const torch::Tensor act =
      UseFusedLayerOps(gate) ? FusedSiluMul(gate, up) : torch::silu(gate) * up;
  return Project(layer, index, Projection::kDown, act, lora, value_needed);
}

std::pair<torch::Tensor, torch::Tensor> LlamaModel::AddRmsNorm(const Residual& r,
                                                               const torch::Tensor& weight) const {
  if (r.pending.defined() && UseFusedLayerOps(r.stream)) {
    return FusedAddRmsNorm(r.stream, r.pending, weight, config_.rms_norm_eps);
  }
  torch::Tensor sum = r.Value();
  return {sum, RmsNorm(sum, weight)};
}

LlamaModel::Residual LlamaModel::Block(int64_t index, const Residual& r, const torch::Tensor& cos,
                                       const torch::Tensor& sin, const PackedSequences& packed,
                                       AttentionCache* cache, const LoraApplier* lora,
                                       bool output_needed) const {
  const DecoderLayer& layer = layers_[index];
  const auto [x, x_normed] = AddRmsNorm(r, layer.input_norm);
  const Residual attended{x, Attention(layer, index, x_normed, cos, sin, packed, cache, lora)};
  const auto [h, h_normed] = AddRmsNorm(attended, layer.post_attention_norm);
  return {h, Mlp(layer, index, h_normed, lora, output_needed)};
}

LlamaModel::Residual LlamaModel::CheckpointedBlock(int64_t index, const torch::Tensor& x,
                                                   const torch::Tensor& cos,
                                                   const torch::Tensor& sin,
                                                   const PackedSequences& packed,
                                                   const std::shared_ptr<const LoraApplier>& lora,
                                                   bool offload, bool keep_mlp) const {
  // The pieces are copied into the autograd graph and run again in backward, after this call
  // has returned: they hold the applier (shared) and the tensors themselves.
  const torch::Tensor attended = CheckpointedCall(
      [this, index, cos, sin, packed, lora](const torch::Tensor& x) {
        const DecoderLayer& layer = layers_[index];
        return Attention(layer, index, RmsNorm(x, layer.input_norm), cos, sin, packed, nullptr,
                         lora.get(), /*value_needed=*/!InCheckpointRecompute());
      },
      x, offload);
  const torch::Tensor h = x + attended;
  return {h, CheckpointedCall(
                 [this, index, lora](const torch::Tensor& h) {
                   const DecoderLayer& layer = layers_[index];
                   return Mlp(layer, index, RmsNorm(h, layer.post_attention_norm), lora.get(),
                              /*value_needed=*/!InCheckpointRecompute());
                 },
                 h, offload, /*park=*/keep_mlp)};
}

torch::Tensor LlamaModel::DecodeStep(const torch::Tensor& ids, const torch::Tensor& positions,
                                     AttentionCache* cache, const LoraApplier* lora) const {
  torch::NoGradGuard no_grad;
  const int64_t rows = ids.size(0);
  const auto [cos, sin] = rope_.CosSin(positions.view({rows, 1}), options_.dtype);
  cache->BeginStep(1);
  Residual h{embed_tokens_.index_select(0, ids).view({rows, 1, -1}), torch::Tensor()};
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
    h = Block(i, h, cos, sin, PackedSequences(), cache, lora);
  }
  cache->EndStep(std::vector<int64_t>(static_cast<size_t>(rows), 1));
  return torch::linear(AddRmsNorm(h, final_norm_).second.select(1, 0), lm_head_);
}

torch::Tensor LlamaModel::ForwardOrThrow(const ForwardBatch& batch, AttentionCache* cache,
                                         const ForwardOptions& options) const {
  std::optional<torch::NoGradGuard> no_grad;
  if (!options.train) no_grad.emplace();
  const auto device = options_.device;
  const torch::Tensor ids = batch.input_ids.to(device, torch::kLong);  // [B, T]
  const int64_t rows = ids.size(0);
  const int64_t tokens = ids.size(1);
  const std::vector<int64_t> lengths = batch.lengths.empty()
                                           ? std::vector<int64_t>(static_cast<size_t>(rows), tokens)
                                           : batch.lengths;
  const auto long_options = torch::TensorOptions().dtype(torch::kLong).device(device);

  // Positions [B, T]: the batch's, or each row continues where its cached tokens end.
  const bool packed = batch.positions.defined();
  torch::Tensor positions = torch::arange(tokens, long_options).view({1, tokens});
  if (packed) {
    positions = batch.positions.to(device, torch::kLong);
  } else if (cache != nullptr) {
    positions =
        torch::tensor(cache->lengths(), torch::kLong).to(device).view({rows, 1}) + positions;
  } else {
    positions = positions.expand({rows, tokens});
  }
  const auto [cos, sin] = rope_.CosSin(positions, options_.dtype);  // [B, T, head_dim]

  // Without a cache: causal attention (the flash kernel on CUDA). Rows are right-padded, so a
  // valid token never sees the padding after it: no mask for that (a padded query's output is
  // neither scored nor seen by a valid one). A packed row's sequences each attend only within
  // themselves: flash attention's variable-length segments on CUDA, a mask elsewhere.
  PackedSequences packed_sequences;
  if (cache == nullptr && packed) {
    packed_sequences = PackedSequences::For(batch.positions, device, PacksWithFlash());
  }

  // Shared: a checkpointed layer recomputes in backward, after this call has returned.
  std::shared_ptr<SingleLoraApplier> lora;
  if (options.adapter != nullptr && options.lora == nullptr) {
    lora = std::make_shared<SingleLoraApplier>(*options.adapter, config_.num_hidden_layers,
                                               options.train);
  }
  const LoraApplier* applier = options.lora != nullptr ? options.lora : lora.get();

  if (cache != nullptr) cache->BeginStep(tokens);
  torch::Tensor h = embed_tokens_.index_select(0, ids.reshape({-1})).view({rows, tokens, -1});
  const bool checkpoint = options.train && options.checkpoint_layers && cache == nullptr &&
                          options.lora == nullptr && torch::GradMode::is_enabled();
  // The layer's backward runs only if its input requires grad; the embedding is frozen.
  if (checkpoint && !h.requires_grad()) h = h.detach().requires_grad_(true);
  const int64_t first_kept = config_.num_hidden_layers - options.checkpoint_skip_last;
  const bool offload = checkpoint && options.offload_checkpoints;
  if (offload) StartOffloadChain();
  // Checkpointed layers whose MLP keeps gate and up: spread evenly over them, so that the copies
  // out (when offloading) spread over the forward.
  const int64_t keep_mlp =
      std::clamp<int64_t>(options.checkpoint_keep_mlp, 0, std::max<int64_t>(first_kept, 0));
  const auto keeps_mlp = [&](int64_t i) {
    return (i + 1) * keep_mlp / first_kept != i * keep_mlp / first_kept;
  };
  Residual residual{h, torch::Tensor()};
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
    if (checkpoint && i < first_kept) {
      // A checkpointed piece takes one tensor: the pending add is done here.
      residual = CheckpointedBlock(i, residual.Value(), cos, sin, packed_sequences, lora, offload,
                                   keeps_mlp(i));
      continue;
    }
    residual = Block(i, residual, cos, sin, packed_sequences, cache, applier);
  }
  if (cache != nullptr) cache->EndStep(lengths);
  // The last offloaded input comes back while the layers after it (and the loss) run backward.
  if (offload) residual.stream = PrefetchLastOffloadedInBackward(residual.stream);
  h = AddRmsNorm(residual, final_norm_).second;  // [B, T, hidden]
  if (options.logits == LogitsMode::kLast) {
    const torch::Tensor last =
        (torch::tensor(lengths, torch::kLong).to(device) - 1).view({rows, 1, 1});
    h = h.gather(1, last.expand({rows, 1, h.size(2)})).squeeze(1);  // [B, hidden]
  }
  if (options.hidden_states) return h;
  return torch::linear(h, lm_head_);
}

absl::StatusOr<torch::Tensor> LlamaModel::Loss(const ForwardBatch& batch,
                                               const torch::Tensor& labels,
                                               const ForwardOptions& options) const {
  if (!labels.defined() || !batch.input_ids.defined() ||
      labels.sizes() != batch.input_ids.sizes()) {
    return Invalid(
        absl::StrCat("labels must have the shape of input_ids [",
                     batch.input_ids.defined() ? absl::StrJoin(batch.input_ids.sizes(), ", ") : "",
                     "], got [", labels.defined() ? absl::StrJoin(labels.sizes(), ", ") : "", "]"));
  }
  ForwardOptions all = options;
  all.logits = LogitsMode::kAll;
  auto logits = Forward(batch, nullptr, all);
  if (!logits.ok()) return logits.status();
  try {
    std::optional<torch::NoGradGuard> no_grad;
    if (!options.train) no_grad.emplace();
    const int64_t rows = labels.size(0);
    const int64_t tokens = labels.size(1);
    // The prediction at t is scored against the token at t + 1; padding never is.
    torch::Tensor target = labels.to(options_.device, torch::kLong).clone();
    const torch::Tensor bad =
        (target != kIgnoreLabel) & ((target < 0) | (target >= config_.vocab_size));
    if (bad.any().item<bool>()) {
      return Invalid(absl::StrCat("labels hold a token id outside the vocabulary [0, ",
                                  config_.vocab_size, ") that is not ", kIgnoreLabel));
    }
    for (size_t b = 0; b < batch.lengths.size(); ++b) {
      target[static_cast<int64_t>(b)]
          .narrow(0, batch.lengths[b], tokens - batch.lengths[b])
          .fill_(kIgnoreLabel);
    }
    target = torch::cat(
        {target.narrow(1, 1, tokens - 1), torch::full({rows, 1}, kIgnoreLabel, target.options())},
        1);
    const torch::Tensor flat = logits->to(torch::kFloat).view({rows * tokens, -1});
    if ((target != kIgnoreLabel).sum().item<int64_t>() == 0) {
      return Invalid("every label is ignored (-100 or padding): nothing to train on");
    }
    return torch::nn::functional::cross_entropy(
        flat, target.view({-1}),
        torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kIgnoreLabel));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("loss failed: ", e.what_without_backtrace()));
  }
}

}  // namespace lorad::engine
