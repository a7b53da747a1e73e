#!/usr/bin/env python3
"""The transformers + PEFT baselines for lorad's engine benchmarks, measured in the same run.

  hf_baseline.py train    --model DIR   LoRA training loop: tokens/s and peak GPU memory
  hf_baseline.py generate --model DIR   model.generate(): end-to-end and decode tokens/s

Each prints a readable line and a "RESULT k=v ..." line in the format of lorad's benches
(trainer_bench, generation_bench) so bench/engine_bench_report.py can pair them.

--base nf4 is the notebook's QLoRA: the base loaded 4-bit by bitsandbytes (load_in_4bit, NF4,
double quantization, bf16 compute), prepare_model_for_kbit_training, and for training
bitsandbytes' 8-bit AdamW. --base bf16 loads the base unquantized (bf16 LoRA: in transformers the
faster of the two, no dequantization, so it favours the baseline on speed and lorad on memory).
--base auto (the default) takes nf4 when bitsandbytes imports, else bf16: the GPU machine has no
bitsandbytes unless the run carries it (bench/fetch_bitsandbytes.sh).
"""
import argparse
import importlib.util
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 1024**3


def resolve_base(base):
    if base != "auto":
        return base
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # not installed, or no library for this CUDA
        return "bf16"
    return "nf4"


def load_model(folder, base):
    from transformers import AutoModelForCausalLM

    if base == "bf16":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                    attn_implementation="sdpa").cuda()
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                attn_implementation="sdpa",
                                                quantization_config=quant, device_map={"": 0})


def lora_config(rank, alpha):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                      bias="none", task_type="CAUSAL_LM")


def base_note(base):
    if base == "nf4":
        return "4-bit NF4 base by bitsandbytes (QLoRA)"
    have = importlib.util.find_spec("bitsandbytes") is not None
    return "bf16 base" + ("" if have else " (bitsandbytes NOT installed: not 4-bit)")


def train(args):
    from peft import get_peft_model

    base = resolve_base(args.base)
    optimizer_name = args.optimizer if args.optimizer != "auto" else (
        "adamw_8bit" if base == "nf4" else "adamw")
    model = load_model(args.model, base)
    model.config.use_cache = False
    if base == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    # PEFT's default autocast_adapter_dtype keeps the LoRA weights in fp32 (master weights),
    # as lorad's trainer does.
    model = get_peft_model(model, lora_config(args.rank, args.alpha))
    if args.gradient_checkpointing and base != "nf4":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name == "adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=args.lr, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    times, tokens = [], args.micro_batch * args.seq
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(3, vocab, (args.micro_batch, args.seq), device="cuda", generator=gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
    peak = torch.cuda.max_memory_allocated() / GIB
    tps = tokens * len(times) / sum(times)
    median_ms = sorted(times)[len(times) // 2] * 1e3
    gc = "on" if args.gradient_checkpointing else "off"
    print(f"transformers+PEFT train on {torch.cuda.get_device_name()}: {base_note(base)}, "
          f"{optimizer_name}, r={args.rank}, batch {args.micro_batch} x {args.seq}, "
          f"gradient checkpointing {gc}: {tps:.0f} tokens/s, median step {median_ms:.1f} ms, "
          f"peak {peak:.2f} GiB", flush=True)
    print(f"RESULT bench=train system=hf base={base} optimizer={optimizer_name} gc={gc} "
          f"batch={args.micro_batch} seq={args.seq} tokens_per_s={tps:.1f} peak_gib={peak:.3f} "
          f"step_ms={median_ms:.2f}", flush=True)


def add_random_adapters(model, count, rank, base):
    """Wraps `model` in PEFT with `count` adapters whose B is small and random (PEFT's init
    leaves B = 0, a no-op that some code paths could skip)."""
    from peft import get_peft_model

    names = [f"bench-{i}" for i in range(count)]
    peft_model = get_peft_model(model, lora_config(rank, rank), adapter_name=names[0],
                                autocast_adapter_dtype=False)
    for name in names[1:]:
        peft_model.add_adapter(name, lora_config(rank, rank))
    torch.manual_seed(2000)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn_like(p) * 0.01)
    if base == "nf4":  # a 4-bit model refuses .to(dtype): only the adapters are cast
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:
                p.data = p.data.to(torch.bfloat16)
    else:
        peft_model.to(torch.bfloat16)
    peft_model.eval()
    return peft_model, names


def time_generate(model, batch, prompt, new, vocab, rep, adapter_names=None):
    gen = torch.Generator(device="cuda").manual_seed(7 + batch)
    ids = torch.randint(3, vocab, (batch, prompt), device="cuda", generator=gen)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                  repetition_penalty=rep, pad_token_id=0, eos_token_id=None)
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names

    def run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(max_new_tokens=n, min_new_tokens=n, **kwargs)
        torch.cuda.synchronize()
        assert out.shape[1] == prompt + n, out.shape
        return time.perf_counter() - t0

    # One untimed pass at the same shapes first, as generation_bench does: first passes ran up
    # to 3.5x slower than repeats on the H200 (per-shape setup as the KV length grows).
    run(new)
    torch.cuda.reset_peak_memory_stats()
    first = run(1)  # prefill + the first token: what decode excludes
    total = run(new)
    peak = torch.cuda.max_memory_allocated() / GIB
    return batch * new / total, batch * (new - 1) / max(total - first, 1e-9), first * 1e3, peak


def generate(args):
    args.base = resolve_base(args.base)
    model = load_model(args.model, args.base)
    model.eval()
    vocab = model.config.vocab_size
    batches = [int(b) for b in args.batches.split(",")]
    print(f"transformers generate on {torch.cuda.get_device_name()}: {base_note(args.base)}, "
          f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens, greedy, repetition "
          f"penalty {args.repetition_penalty}", flush=True)
    rows = []  # (batch, adapters, result)
    with torch.no_grad():
        time_generate(model, 2, 16, 8, vocab, args.repetition_penalty)  # warm-up
        for batch in batches:
            rows.append((batch, 0, time_generate(model, batch, args.prompt_tokens,
                                                 args.new_tokens, vocab,
                                                 args.repetition_penalty)))
            print_row(args, *rows[-1])
        if args.adapters > 0:
            peft_model, names = add_random_adapters(model, args.adapters, args.rank, args.base)
            # PEFT's mixed-adapter batches: one name per row (peft >= 0.10).
            time_generate(peft_model, 2, 16, 8, vocab, args.repetition_penalty,
                          adapter_names=names[:2])
            for batch in batches:
                per_row = [names[i % len(names)] for i in range(batch)]
                rows.append((batch, args.adapters,
                             time_generate(peft_model, batch, args.prompt_tokens, args.new_tokens,
                                           vocab, args.repetition_penalty,
                                           adapter_names=per_row)))
                print_row(args, *rows[-1])


def print_row(args, batch, adapters, result):
    e2e, decode, ttft_ms, peak = result
    print(f"  batch {batch:3d}, adapters {adapters}: {e2e:9.1f} e2e tok/s, {decode:9.1f} decode "
          f"tok/s, first token {ttft_ms:.1f} ms, peak {peak:.2f} GiB", flush=True)
    print(f"RESULT bench=generate system=hf base={args.base} batch={batch} adapters={adapters} "
          f"rep={args.repetition_penalty:.2f} e2e_tokens_per_s={e2e:.1f} "
          f"decode_tokens_per_s={decode:.1f} ttft_ms={ttft_ms:.1f} peak_gib={peak:.3f}",
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--model", required=True)
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--alpha", type=float, default=16)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--micro-batch", type=int, default=2)
    t.add_argument("--seq", type=int, default=512)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--base", choices=["auto", "bf16", "nf4"], default="auto")
    t.add_argument("--optimizer", choices=["auto", "adamw", "adamw_8bit"], default="auto",
                   help="auto: adamw_8bit on an nf4 base (the notebook's), else adamw")
    g = sub.add_parser("generate")
    g.add_argument("--model", required=True)
    g.add_argument("--batches", default="1,8,32")
    g.add_argument("--prompt-tokens", type=int, default=128)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--adapters", type=int, default=4)
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--base", choices=["auto", "bf16", "nf4"], default="auto")
    args = ap.parse_args()
    train(args) if args.cmd == "train" else generate(args)


if __name__ == "__main__":
    main()
