"""An adapter lorad writes loads in PEFT: PeftModel.from_pretrained on the tiny model takes every
tensor (no missing or unexpected keys) and the same settings PEFT would have saved itself."""
import warnings

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import tiny_model_path
from test_safetensors import run_parity_test

TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_peft_loads_adapter_written_by_lorad(tmp_path):
    run_parity_test("PeftIoParity.WritesAdapterForPeft",
                    {"LORAD_PEFT_IO_OUT": str(tmp_path), "LORAD_TINY_MODEL": tiny_model_path()})
    folder = tmp_path / "adapter"
    written = load_file(str(folder / "adapter_model.safetensors"))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(folder))
    # PEFT only warns (and keeps its own init) when keys do not match: make that a failure.
    key_warnings = [str(w.message) for w in caught
                    if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not key_warnings, key_warnings

    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.05)
    assert set(config.target_modules) == TARGETS
    assert not config.use_rslora and config.bias == "none"

    loaded = 0
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})):
            continue
        key = name  # "base_model.model.model.layers.0...": PEFT's module names are its keys
        a = module.lora_A["default"].weight
        b = module.lora_B["default"].weight
        assert torch.equal(a, written[f"{key}.lora_A.weight"]), name
        assert torch.equal(b, written[f"{key}.lora_B.weight"]), name
        assert b.abs().max() > 0, name  # lorad's values, not PEFT's zero init
        assert module.scaling["default"] == 2.0, name
        loaded += 1
    assert loaded == 2 * len(TARGETS) == len(written) // 2

    # The config PEFT reads back equals the one PEFT itself would save for these settings.
    ours = LoraConfig.from_pretrained(str(folder)).to_dict()
    peft_own = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(TARGETS),
                          task_type="CAUSAL_LM", base_model_name_or_path=tiny_model_path(),
                          inference_mode=True).to_dict()
    for d in (ours, peft_own):
        d["target_modules"] = set(d["target_modules"])
        d.pop("peft_version", None)
    assert ours == peft_own
