"""LoRA adapters saved by PEFT on the tiny model (and on models of other shapes), with the values
PEFT holds in its modules, for lorad's PEFT reader to compare against.

out/adapter            r=8, alpha=16, dropout=0.05, all seven targets, random non-zero A and B
out/adapter_bf16       the same adapter saved in bfloat16
out/adapter_rslora     r=4, alpha=8, use_rslora, q_proj and v_proj only
out/adapter_hidden64   made for a model with hidden_size 64: does not fit the tiny model
out/adapter_3layers    made for a model with 3 layers: layer 2 does not exist in the tiny model
out/expected*.safetensors  "<module path>.A" / ".B" in fp32, read from PEFT's modules (not the file)
out/expected.json      the configs and scalings PEFT uses
"""
import json
import pathlib

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


def lora_modules(peft_model):
    """(lorad module path, PEFT LoRA layer) for every adapted projection."""
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            yield name[len(PREFIX):], module


def make_adapter(base, seed: int, **config):
    """A PEFT model with random non-zero A and B (PEFT's own init has B = 0)."""
    peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(peft_model):
            for factor in (module.lora_A["default"], module.lora_B["default"]):
                factor.weight.copy_(torch.randn(factor.weight.shape, generator=g) * 0.1)
    return peft_model


def expected_tensors(peft_model) -> dict:
    out = {}
    for path, module in lora_modules(peft_model):
        out[f"{path}.A"] = module.lora_A["default"].weight.detach().float().contiguous()
        out[f"{path}.B"] = module.lora_B["default"].weight.detach().float().contiguous()
    return out


def summary(peft_model) -> dict:
    cfg = peft_model.peft_config["default"]
    scalings = {module.scaling["default"] for _, module in lora_modules(peft_model)}
    assert len(scalings) == 1
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted(cfg.target_modules), "use_rslora": cfg.use_rslora,
            "base_model_name_or_path": cfg.base_model_name_or_path,
            "scaling": scalings.pop(), "num_layers": len(list(lora_modules(peft_model)))}


def other_shape(model: pathlib.Path, **changes):
    """A randomly initialised model like the tiny one with some dimensions changed."""
    config = AutoConfig.from_pretrained(model)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    expected = {}

    peft_model = make_adapter(AutoModelForCausalLM.from_pretrained(model), seed=1, r=8,
                              lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS)
    peft_model.save_pretrained(out / "adapter")
    save_file(expected_tensors(peft_model), str(out / "expected.safetensors"))
    expected["adapter"] = summary(peft_model)

    peft_model = peft_model.to(torch.bfloat16)
    peft_model.save_pretrained(out / "adapter_bf16")
    save_file(expected_tensors(peft_model), str(out / "expected_bf16.safetensors"))
    expected["adapter_bf16"] = summary(peft_model)

    peft_model = make_adapter(AutoModelForCausalLM.from_pretrained(model), seed=2, r=4,
                              lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])
    peft_model.save_pretrained(out / "adapter_rslora")
    save_file(expected_tensors(peft_model), str(out / "expected_rslora.safetensors"))
    expected["adapter_rslora"] = summary(peft_model)

    for name, changes in [("adapter_hidden64", {"hidden_size": 64, "head_dim": 16}),
                          ("adapter_3layers", {"num_hidden_layers": 3})]:
        peft_model = make_adapter(other_shape(model, **changes), seed=3, r=8, lora_alpha=16,
                                  target_modules=TARGETS)
        peft_model.save_pretrained(out / name)
        expected[name] = summary(peft_model)

    (out / "expected.json").write_text(json.dumps(expected, indent=1))
