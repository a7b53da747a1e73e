"""A safetensors file written by the Python library (every dtype lorad reads, an empty tensor, a
scalar, metadata) and the values it holds, as JSON, for the C++ reader to compare against."""
import json
import pathlib

import torch
from safetensors.torch import save_file

METADATA = {"format": "pt", "source": "reference_safetensors.py", "unicode": "grüße ✓"}


def tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "f64": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "f32": torch.randn(2, 3, 5, generator=g),
        "f16": torch.randn(7, generator=g).to(torch.float16),  # odd size: alignment of the rest
        "bf16": (torch.randn(4, 3, generator=g) * 100).to(torch.bfloat16),
        "i64": torch.tensor([-(2**63), -1, 0, 2**62 + 5, 2**63 - 1], dtype=torch.int64),
        "i32": torch.randint(-(2**31), 2**31 - 1, (6,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-(2**15), 2**15 - 1, (2, 2), generator=g, dtype=torch.int16),
        "i8": torch.arange(-128, 128, 17, dtype=torch.int8),
        "u8": torch.arange(0, 256, 15, dtype=torch.uint8),
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(3.25),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 4, generator=g),
    }


DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
               torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
               torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write(out: pathlib.Path, model: pathlib.Path) -> None:
    ts = tensors()
    save_file(ts, str(out / "all_dtypes.safetensors"), metadata=METADATA)
    # Floats as float64 (exact for every float dtype; JSON round-trips doubles), ints as ints.
    values = {
        name: {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "values": (t.to(torch.float64) if t.is_floating_point() else t.to(torch.int64))
            .flatten().tolist(),
        }
        for name, t in ts.items()
    }
    (out / "all_dtypes.json").write_text(json.dumps({"metadata": METADATA, "tensors": values}))
