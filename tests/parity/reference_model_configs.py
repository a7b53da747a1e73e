"""Model config references: how transformers reads config.json files that leave fields out or
carry unusual ones (per-architecture defaults for num_key_value_heads, max_position_embeddings and
the sliding window; rope_scaling beside rope_parameters; a top-level
original_max_position_embeddings; Qwen2's q/k/v bias whatever attention_bias says). Each case's
config.json is loaded with AutoConfig.from_pretrained and a model is built from it to see which
projections carry a bias.

Output (out = <build>/parity/model_configs/cases.json): [{"name", "config": {...},
  "refused": bool, "num_key_value_heads", "max_position_embeddings", "sliding_window" (the window
  of the layers that slide, 0 when none does), "q_bias", "o_bias", "mlp_bias",
  "rope": {"type", "theta", "factor", "low_freq_factor", "high_freq_factor",
           "original_max_position_embeddings"}}]
"""
import json
import pathlib
import tempfile

BASE = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 16}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "rope_theta": 500000.0}

CASES = {
    "llama_minimal": ("llama", {}),
    "llama_kv_null": ("llama", {"num_key_value_heads": None}),
    "llama_llama3_top_level_original": (
        "llama", {"max_position_embeddings": 512, "original_max_position_embeddings": 64,
                  "rope_scaling": dict(LLAMA3, original_max_position_embeddings=128)}),
    "llama_llama3_without_original": (
        "llama", {"max_position_embeddings": 256, "rope_parameters": LLAMA3}),
    "llama_scaling_beside_parameters": (
        "llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                  "rope_scaling": dict(LLAMA3, original_max_position_embeddings=32)}),
    "llama_top_level_theta": ("llama", {"rope_theta": 250000.0}),
    "llama_biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama_sliding_window_ignored": ("llama", {"sliding_window": 16}),
    "mistral_minimal": ("mistral", {}),
    "mistral_window_null": ("mistral", {"sliding_window": None, "num_key_value_heads": 4}),
    "mistral_window": ("mistral", {"sliding_window": 16, "max_position_embeddings": 64}),
    "qwen2_minimal": ("qwen2", {"num_attention_heads": 32}),
    "qwen2_attention_bias_false": ("qwen2", {"attention_bias": False,
                                             "num_key_value_heads": 4}),
    "qwen2_window_default_layers": (
        "qwen2", {"num_hidden_layers": 30, "use_sliding_window": True, "sliding_window": 16,
                  "num_key_value_heads": 4, "max_position_embeddings": 64}),
    "qwen2_window_default_size": (
        "qwen2", {"use_sliding_window": True, "max_window_layers": 1, "num_key_value_heads": 4,
                  "max_position_embeddings": 8192}),
    "qwen2_window_unused": ("qwen2", {"sliding_window": 16, "num_key_value_heads": 4,
                                      "max_position_embeddings": 64}),
    "qwen2_yarn_beside_parameters": (
        "qwen2", {"num_key_value_heads": 4,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                  "rope_scaling": {"type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 32}}),
}


def _reference(model_type, fields):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(BASE, model_type=model_type, **fields)
    with tempfile.TemporaryDirectory() as folder:
        (pathlib.Path(folder) / "config.json").write_text(json.dumps(config))
        try:
            cfg = AutoConfig.from_pretrained(folder)
            model = AutoModelForCausalLM.from_config(cfg)
        except (ValueError, KeyError) as e:  # a rope type transformers itself cannot build
            return config, {"refused": True, "why": str(e)}
    rope = dict(cfg.rope_parameters)
    if rope.get("rope_type") not in ("default", "llama3"):
        return config, {"refused": True, "why": rope.get("rope_type")}
    layer = model.model.layers[0]
    layer_types = getattr(cfg, "layer_types", None) or []
    if model_type == "llama":
        window = 0
    elif model_type == "mistral":
        window = cfg.sliding_window or 0
    else:
        window = cfg.sliding_window if "sliding_attention" in layer_types else 0
    return config, {
        "refused": False,
        "num_key_value_heads": cfg.num_key_value_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "sliding_window": window or 0,
        "q_bias": layer.self_attn.q_proj.bias is not None,
        "o_bias": layer.self_attn.o_proj.bias is not None,
        "mlp_bias": layer.mlp.gate_proj.bias is not None,
        "rope": {"type": rope["rope_type"], "theta": rope["rope_theta"],
                 "factor": rope.get("factor", 0.0),
                 "low_freq_factor": rope.get("low_freq_factor", 0.0),
                 "high_freq_factor": rope.get("high_freq_factor", 0.0),
                 "original_max_position_embeddings":
                     rope.get("original_max_position_embeddings", 0)},
    }


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    cases = []
    for name, (model_type, fields) in CASES.items():
        config, expected = _reference(model_type, fields)
        cases.append(dict(name=name, config=config, **expected))
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
