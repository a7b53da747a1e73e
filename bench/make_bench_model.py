#!/usr/bin/env python3
"""Writes a random-init Llama model folder for the engine benchmarks (no download needed).

The GPU machine has no network, so the benchmark model is made there: a LlamaForCausalLM of a
real model's shape (default: about 1.1B parameters, TinyLlama-1.1B's shape) with random weights
in bf16 safetensors, plus the tokenizer files of lorad's tiny fixture model. That tokenizer knows
only 512 of the 32000 ids; the benchmarks feed token ids or long texts, and lorad decodes ids it
does not know to "", so the mismatch costs nothing but readable output.

Speed does not depend on the weights' values, only on shapes and dtypes, so random init is as
good as a trained checkpoint here (apart from EOS: generation benches ignore it).

Usage: make_bench_model.py --out DIR --tokenizer-from TINY_MODEL_DIR [--shape 1b|8b]
"""
import argparse
import json
import pathlib
import shutil

# Shapes of the models the issues name. "1b" is the brief's ~1B config; "8b" is Llama-3-8B's
# shape with a 32000 vocabulary (the tokenizer is the tiny one either way).
SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=5632),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336),
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--tokenizer-from", required=True, type=pathlib.Path,
                    help="a folder with the tiny fixture model's tokenizer files")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.02,
        **SHAPES[args.shape],
    )
    # Initialise on the GPU when there is one: a 1B model's init on the CPU takes most of a
    # minute, and the device time is what the benchmark budget counts.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(args.tokenizer_from / name, args.out / name)
    (args.out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2) + "\n")
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {args.shape} shape, {params / 1e9:.2f}B parameters, bf16")


if __name__ == "__main__":
    main()
