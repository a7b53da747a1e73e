"""NF4 references from bitsandbytes on the CPU: quantize_4bit / dequantize_4bit bytes and values,
and a Linear4bit state dict as transformers saves pre-quantized checkpoints.

Writes into out/:
  cases.json                 [{"name", "shape", "dtype"}]
  cases.safetensors          per case <name>.weight (the input), .packed, .absmax (uint8),
                             .absmax2, .code2, .offset ([1] f32), .dequant (in the input dtype),
                             .dequant_f32
  checkpoint.safetensors     a Linear4bit state dict under CHECKPOINT_PREFIX
  checkpoint.json            {"name": <weight key>, "dtype": ...}
  checkpoint_dequant.safetensors  {"dequant": bitsandbytes' dequantized weight, "weight": the
                             bf16 weight it quantized}
"""
import copy
import json
import pathlib

import torch
from safetensors.torch import save_file

import bitsandbytes as bnb
import bitsandbytes.functional as F

# (name, shape, dtype): absmax counts that are and are not multiples of 256, a short last
# 64-block, an odd element count, and every input dtype bitsandbytes accepts.
CASES = [
    ("f32_64x256", (64, 256), torch.float32),       # 256 blocks: one full nested block
    ("f32_96x200", (96, 200), torch.float32),       # 300 blocks: a short nested block
    ("bf16_128x1024", (128, 1024), torch.bfloat16),  # 2048 blocks
    ("bf16_33x100", (33, 100), torch.bfloat16),     # 3300 values: a short last 64-block
    ("f16_300x640", (300, 640), torch.float16),     # 3000 blocks
    ("f16_7x9", (7, 9), torch.float16),             # 63 values: odd count, one short block
]
CHECKPOINT_PREFIX = "model.layers.0.self_attn.q_proj."


def weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    # Real weights have outliers and the odd dead row: a few large values and an all-zero block.
    flat = w.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=g)
    flat[idx] *= 40
    # The zero block is a full one: bitsandbytes' CPU backend clamps a *short last* block's absmax
    # to 1e-38 (its CUDA kernel and lorad store 0), a difference that changes no dequantized value.
    if flat.numel() >= 128:
        flat[:64] = 0
    return w.to(dtype)


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    tensors = {}
    cases = []
    for seed, (name, shape, dtype) in enumerate(CASES):
        w = weight(shape, dtype, seed)
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                        quant_type="nf4")
        state_f32 = copy.copy(state)
        state_f32.dtype = torch.float32
        tensors.update({
            f"{name}.weight": w.contiguous(),
            f"{name}.packed": packed.reshape(-1).contiguous(),
            f"{name}.absmax": state.absmax.contiguous(),
            f"{name}.absmax2": state.state2.absmax.contiguous(),
            f"{name}.code2": state.state2.code.contiguous(),
            f"{name}.offset": state.offset.reshape(1).float().contiguous(),
            f"{name}.dequant": F.dequantize_4bit(packed, state).contiguous(),
            f"{name}.dequant_f32": F.dequantize_4bit(packed, state_f32).contiguous(),
        })
        cases.append({"name": name, "shape": list(shape), "dtype": str(dtype).split(".")[-1]})
    save_file(tensors, str(out / "cases.safetensors"))
    (out / "cases.json").write_text(json.dumps(cases, indent=1))

    # A pre-quantized checkpoint: Linear4bit quantizes when moved to a device, and its state dict
    # is what transformers writes for a bitsandbytes 4-bit model.
    w = weight((192, 320), torch.bfloat16, 100)
    layer = bnb.nn.Linear4bit(320, 192, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64)
    layer = layer.to("cpu")
    state_dict = {CHECKPOINT_PREFIX + k: v.contiguous() for k, v in layer.state_dict().items()}
    save_file(state_dict, str(out / "checkpoint.safetensors"))
    q = layer.weight
    save_file({"dequant": F.dequantize_4bit(q.data, q.quant_state).contiguous(), "weight": w},
              str(out / "checkpoint_dequant.safetensors"))
    (out / "checkpoint.json").write_text(json.dumps(
        {"name": CHECKPOINT_PREFIX + "weight", "dtype": "bfloat16", "keys": sorted(state_dict)}))
