#!/usr/bin/env python3
"""Computes the reference values the C++ parity tests compare against.

Every module tests/parity/reference_<topic>.py defines write(out: Path, model: Path) and writes
its references (safetensors for tensors, JSON for the rest) into out/<topic>/ using the Python
reference stack (transformers, PEFT, bitsandbytes, tokenizers). ctest runs this once, as the
`parity_references` fixture, before the C++ parity tests (tests/parity/*_test.cpp) read them.
Nothing here is pasted by hand: every expected value comes from a reference implementation.
"""
import argparse
import importlib
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--model", default=os.environ.get("LORAD_MODEL"), type=pathlib.Path)
    ap.add_argument("--only", default="", help="comma-separated topics to regenerate")
    args = ap.parse_args()
    if args.model is None:
        print("make_references.py: --model or LORAD_MODEL is required", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(HERE))
    only = {t for t in args.only.split(",") if t}
    for path in sorted(HERE.glob("reference_*.py")):
        topic = path.stem[len("reference_"):]
        if only and topic not in only:
            continue
        out = args.out / topic
        out.mkdir(parents=True, exist_ok=True)
        importlib.import_module(path.stem).write(out, args.model)
        print(f"parity references: {topic} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
